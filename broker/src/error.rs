//! The broker's protocol error: one typed value carrying its scope (channel or connection),
//! reply code, reply text and the class/method that caused it.

use amq_protocol::protocol::AMQPClass;
use amq_protocol::types::ShortString;
use std::fmt;

/// Whether an error closes one channel or the whole connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// channel.close: the connection lives on.
    Channel,
    /// connection.close: every channel of the connection ends.
    Connection,
}

/// RabbitMQ's upper-case name of a reply code, the prefix of every reply text.
pub fn reply_code_name(code: u16) -> &'static str {
    match code {
        311 => "CONTENT_TOO_LARGE",
        312 => "NO_ROUTE",
        313 => "NO_CONSUMERS",
        320 => "CONNECTION_FORCED",
        402 => "INVALID_PATH",
        403 => "ACCESS_REFUSED",
        404 => "NOT_FOUND",
        405 => "RESOURCE_LOCKED",
        406 => "PRECONDITION_FAILED",
        501 => "FRAME_ERROR",
        502 => "SYNTAX_ERROR",
        503 => "COMMAND_INVALID",
        504 => "CHANNEL_ERROR",
        505 => "UNEXPECTED_FRAME",
        506 => "RESOURCE_ERROR",
        530 => "NOT_ALLOWED",
        540 => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

/// A protocol error raised while handling a frame.
///
/// ```
/// use warren_broker::error::AmqpError;
/// let e = AmqpError::not_found("no queue 'jobs' in vhost '/'");
/// assert_eq!(e.code, 404);
/// assert_eq!(e.text, "NOT_FOUND - no queue 'jobs' in vhost '/'");
/// assert!(!e.is_connection_error());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AmqpError {
    /// Channel or connection.
    pub scope: Scope,
    /// AMQP reply code, e.g. 404.
    pub code: u16,
    /// Reply text in RabbitMQ's form: `NAME - detail`.
    pub text: String,
    /// Class id of the method that failed (0 when none).
    pub class_id: u16,
    /// Method id of the method that failed (0 when none).
    pub method_id: u16,
}

macro_rules! constructors {
    ($($(#[$doc:meta])* $name:ident => $scope:ident $code:literal;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(detail: impl fmt::Display) -> Self {
                Self::new(Scope::$scope, $code, detail)
            }
        )*
    };
}

impl AmqpError {
    /// An error with this code and detail; the text gets RabbitMQ's `NAME - ` prefix.
    pub fn new(scope: Scope, code: u16, detail: impl fmt::Display) -> Self {
        let text = format!("{} - {detail}", reply_code_name(code));
        Self {
            scope,
            code,
            text,
            class_id: 0,
            method_id: 0,
        }
    }

    constructors! {
        /// 403 ACCESS_REFUSED, channel scope.
        access_refused => Channel 403;
        /// 404 NOT_FOUND, channel scope.
        not_found => Channel 404;
        /// 405 RESOURCE_LOCKED, channel scope.
        resource_locked => Channel 405;
        /// 406 PRECONDITION_FAILED, channel scope.
        precondition_failed => Channel 406;
        /// 320 CONNECTION_FORCED, connection scope.
        connection_forced => Connection 320;
        /// 403 ACCESS_REFUSED, connection scope (login refused).
        login_refused => Connection 403;
        /// 501 FRAME_ERROR, connection scope.
        frame_error => Connection 501;
        /// 502 SYNTAX_ERROR, connection scope.
        syntax_error => Connection 502;
        /// 503 COMMAND_INVALID, connection scope.
        command_invalid => Connection 503;
        /// 504 CHANNEL_ERROR, connection scope.
        channel_error => Connection 504;
        /// 505 UNEXPECTED_FRAME, connection scope.
        unexpected_frame => Connection 505;
        /// 530 NOT_ALLOWED, connection scope.
        not_allowed => Connection 530;
        /// 540 NOT_IMPLEMENTED, connection scope.
        not_implemented => Connection 540;
        /// 541 INTERNAL_ERROR, connection scope.
        internal_error => Connection 541;
    }

    /// 503 COMMAND_INVALID for a method only a server sends (or one RabbitMQ does not take
    /// from a client), with RabbitMQ's text for it.
    pub fn server_method() -> Self {
        Self::command_invalid("unimplemented method")
    }

    /// Records the method that caused the error.
    pub fn during(mut self, method: &AMQPClass) -> Self {
        self.class_id = method.get_amqp_class_id();
        self.method_id = method.get_amqp_method_id();
        self
    }

    /// Records the class and method ids that caused the error, unless already set.
    pub fn during_ids(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }

    /// Whether the error closes the connection (rather than one channel).
    pub fn is_connection_error(&self) -> bool {
        self.scope == Scope::Connection
    }

    /// The reply text as a short string, cut to 255 bytes on a character boundary.
    pub fn reply_text(&self) -> ShortString {
        short_string_lossy(&self.text)
    }
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

impl std::error::Error for AmqpError {}

/// A short string from any text, cut as RabbitMQ cuts reply texts: a text over 255 bytes
/// becomes its first 252 bytes (on a character boundary) and `...`.
pub(crate) fn short_string_lossy(text: &str) -> ShortString {
    if text.len() <= 255 {
        return ShortString::try_new(text).expect("at most 255 bytes");
    }
    let mut end = 252;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(format!("{}...", &text[..end])).expect("cut to 255 bytes")
}

/// Result of a handler.
pub(crate) type AmqpResult<T = ()> = Result<T, AmqpError>;
