//! The seed's service: exact Fibonacci numbers, and the request body that asks for one.
//!
//! A request body is the ASCII decimal `n` (surrounding ASCII whitespace is allowed, as with
//! Python's `int(body)`); the reply body is the ASCII decimal `fib(n)`. `fib(n)` is computed
//! iteratively in `u128`, which holds it exactly up to [`MAX_N`] = 186; a larger `n` is an
//! error, never an overflow.

use crate::server::{Handler, HandlerError};
use std::fmt;

/// The largest `n` whose `fib(n)` fits in a `u128`.
///
/// ```
/// assert_eq!(warren_rpc::fib::MAX_N, 186);
/// assert!(warren_rpc::fib::fib(warren_rpc::fib::MAX_N + 1).is_err());
/// ```
pub const MAX_N: u32 = 186;

/// The longest piece of a bad request quoted back in an error message, in characters.
const QUOTE_MAX_CHARS: usize = 40;

/// Why a request could not be answered. The [`Display`](fmt::Display) text is the message
/// sent back to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FibError {
    /// The body is empty (or only whitespace).
    Empty,
    /// The body is not UTF-8 text.
    NotUtf8,
    /// The body is text but not a decimal integer; the (possibly cut) text.
    NotANumber(String),
    /// The body is a negative decimal integer; its text.
    Negative(String),
    /// `n` is larger than [`MAX_N`]; its decimal text (possibly cut).
    TooLarge(String),
}

impl fmt::Display for FibError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "empty request: expected a decimal n"),
            Self::NotUtf8 => write!(f, "request is not UTF-8 text: expected a decimal n"),
            Self::NotANumber(text) => {
                write!(f, "not a decimal integer: {text:?} (expected a decimal n)")
            }
            Self::Negative(text) => write!(f, "n must not be negative, got {text}"),
            Self::TooLarge(text) => write!(
                f,
                "n = {text} is too large: fib(n) is exact in u128 only for n <= {MAX_N}"
            ),
        }
    }
}

impl std::error::Error for FibError {}

impl From<FibError> for HandlerError {
    fn from(error: FibError) -> Self {
        HandlerError::new(error.to_string())
    }
}

/// The `n`-th Fibonacci number (`fib(0) = 0`, `fib(1) = 1`), exact.
///
/// # Errors
/// [`FibError::TooLarge`] when `n > MAX_N`.
///
/// ```
/// use warren_rpc::fib::fib;
/// assert_eq!(fib(30), Ok(832_040));
/// assert_eq!(fib(186), Ok(332_825_110_087_067_562_321_196_029_789_634_457_848));
/// ```
pub fn fib(n: u32) -> Result<u128, FibError> {
    if n > MAX_N {
        return Err(FibError::TooLarge(n.to_string()));
    }
    let (mut previous, mut current) = (0_u128, 1_u128);
    if n == 0 {
        return Ok(0);
    }
    // Invariant: current = fib(i), previous = fib(i - 1). Stops at fib(n), never computing
    // fib(n + 1), which for n = MAX_N would not fit.
    for _ in 1..n {
        (previous, current) = (current, previous + current);
    }
    Ok(current)
}

/// Parses a request body into `n`, with a clear error for anything that is not a decimal
/// integer in `0..=MAX_N`.
///
/// ```
/// use warren_rpc::fib::{parse_request, FibError};
/// assert_eq!(parse_request(b"30"), Ok(30));
/// assert_eq!(parse_request(b" 7\n"), Ok(7));
/// assert_eq!(parse_request(b"-1"), Err(FibError::Negative("-1".into())));
/// assert_eq!(parse_request(b"187"), Err(FibError::TooLarge("187".into())));
/// assert_eq!(parse_request(b""), Err(FibError::Empty));
/// ```
///
/// # Errors
/// [`FibError::Empty`], [`FibError::NotUtf8`], [`FibError::NotANumber`],
/// [`FibError::Negative`] or [`FibError::TooLarge`].
pub fn parse_request(body: &[u8]) -> Result<u32, FibError> {
    let text = std::str::from_utf8(body).map_err(|_| FibError::NotUtf8)?;
    let text = text.trim_ascii();
    if text.is_empty() {
        return Err(FibError::Empty);
    }
    let is_decimal = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(magnitude) = text.strip_prefix('-')
        && is_decimal(magnitude)
    {
        return Err(FibError::Negative(quote(text)));
    }
    if !is_decimal(text) {
        return Err(FibError::NotANumber(quote(text)));
    }
    match text.parse::<u32>() {
        Ok(n) if n <= MAX_N => Ok(n),
        // Too many digits for a u32 is too large as well: all digits were checked above.
        _ => Err(FibError::TooLarge(quote(text))),
    }
}

/// Answers one request body: the reply body (decimal `fib(n)`) or the error to send back.
///
/// ```
/// assert_eq!(warren_rpc::fib::answer(b"10").unwrap(), b"55");
/// ```
///
/// # Errors
/// Whatever [`parse_request`] refuses.
pub fn answer(body: &[u8]) -> Result<Vec<u8>, FibError> {
    let n = parse_request(body)?;
    Ok(fib(n)?.to_string().into_bytes())
}

/// Cuts a text to [`QUOTE_MAX_CHARS`] characters for an error message.
fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_MAX_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The fib service as a [`Handler`] for [`RpcServer`](crate::RpcServer): [`answer`] on every
/// request.
///
/// ```no_run
/// # async fn demo(conn: &lapin::Connection) -> Result<(), warren_rpc::RpcError> {
/// use warren_rpc::{fib::FibHandler, RpcServer, ServerConfig};
/// let server = RpcServer::start(conn, ServerConfig::default(), FibHandler).await?;
/// # server.shutdown().await }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct FibHandler;

impl Handler for FibHandler {
    async fn handle(&self, request: Vec<u8>) -> Result<Vec<u8>, HandlerError> {
        Ok(answer(&request)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fib_small_values() {
        let expected = [0_u128, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55];
        for (n, want) in expected.iter().enumerate() {
            assert_eq!(fib(n as u32), Ok(*want), "fib({n})");
        }
        assert_eq!(fib(30), Ok(832_040));
    }

    #[test]
    fn fib_edges() {
        assert_eq!(fib(0), Ok(0));
        assert_eq!(fib(1), Ok(1));
        assert_eq!(fib(2), Ok(1));
        // fib(93) is the largest Fibonacci number that fits a u64; fib(94) is the first that
        // does not.
        assert_eq!(fib(93), Ok(12_200_160_415_121_876_738));
        assert!(fib(93).unwrap() <= u128::from(u64::MAX));
        assert_eq!(fib(94), Ok(19_740_274_219_868_223_167));
        assert!(fib(94).unwrap() > u128::from(u64::MAX));
        // fib(186) is the largest that fits a u128.
        assert_eq!(
            fib(186),
            Ok(332_825_110_087_067_562_321_196_029_789_634_457_848)
        );
        assert_eq!(fib(187), Err(FibError::TooLarge("187".into())));
        assert_eq!(fib(u32::MAX), Err(FibError::TooLarge(u32::MAX.to_string())));
    }

    #[test]
    fn fib_matches_the_recurrence_up_to_max() {
        for n in 2..=MAX_N {
            assert_eq!(
                fib(n).unwrap(),
                fib(n - 1).unwrap() + fib(n - 2).unwrap(),
                "n = {n}"
            );
        }
        // fib(187) = fib(186) + fib(185) overflows u128: the reason for MAX_N.
        assert!(fib(186).unwrap().checked_add(fib(185).unwrap()).is_none());
    }

    #[test]
    fn parse_accepts_decimals_in_range() {
        assert_eq!(parse_request(b"0"), Ok(0));
        assert_eq!(parse_request(b"30"), Ok(30));
        assert_eq!(parse_request(b"186"), Ok(186));
        assert_eq!(parse_request(b"007"), Ok(7));
        assert_eq!(parse_request(b"\t 42 \r\n"), Ok(42));
    }

    #[test]
    fn parse_refuses_with_clear_errors() {
        assert_eq!(parse_request(b""), Err(FibError::Empty));
        assert_eq!(parse_request(b"  \n"), Err(FibError::Empty));
        assert_eq!(parse_request(&[0xff, 0xfe]), Err(FibError::NotUtf8));
        assert_eq!(
            parse_request(b"abc"),
            Err(FibError::NotANumber("abc".into()))
        );
        assert_eq!(
            parse_request(b"1.5"),
            Err(FibError::NotANumber("1.5".into()))
        );
        assert_eq!(parse_request(b"+5"), Err(FibError::NotANumber("+5".into())));
        assert_eq!(parse_request(b"-"), Err(FibError::NotANumber("-".into())));
        assert_eq!(parse_request(b"-5"), Err(FibError::Negative("-5".into())));
        assert_eq!(parse_request(b"187"), Err(FibError::TooLarge("187".into())));
        let huge = "9".repeat(100);
        assert_eq!(
            parse_request(huge.as_bytes()),
            Err(FibError::TooLarge(format!("{}...", "9".repeat(40))))
        );
    }

    #[test]
    fn error_messages_name_the_problem() {
        assert_eq!(
            FibError::TooLarge("187".into()).to_string(),
            "n = 187 is too large: fib(n) is exact in u128 only for n <= 186"
        );
        assert_eq!(
            FibError::Negative("-3".into()).to_string(),
            "n must not be negative, got -3"
        );
        assert!(FibError::NotUtf8.to_string().contains("UTF-8"));
        assert!(FibError::Empty.to_string().contains("empty"));
        assert!(
            FibError::NotANumber("x".into())
                .to_string()
                .contains("not a decimal integer")
        );
    }

    #[test]
    fn answer_is_the_decimal_result() {
        assert_eq!(answer(b"30").unwrap(), b"832040");
        assert_eq!(
            answer(b"186").unwrap(),
            b"332825110087067562321196029789634457848"
        );
        assert_eq!(answer(b"187"), Err(FibError::TooLarge("187".into())));
    }

    #[test]
    fn quote_cuts_on_char_boundaries() {
        let long = "é".repeat(50);
        let quoted = quote(&long);
        assert_eq!(quoted, format!("{}...", "é".repeat(40)));
        assert_eq!(quote("short"), "short");
    }
}
