//! Users and what they may do in each vhost, as RabbitMQ's internal database keeps them
//! (`rabbitmqctl add_user`, `set_permissions`): three regular expressions per user and vhost
//! (PCRE's syntax, as RabbitMQ's, look-around and back-references included), matched against
//! the names of the queues and exchanges an operation touches. A user with
//! no permissions in a vhost may not open it (530).
//!
//! The users of [`crate::BrokerConfig::users`] get `.*` for every vhost, also the ones added
//! later (what the harness grants its user on RabbitMQ); users added at run time get nothing
//! until permissions are set for them.

use crate::credential::Credential;
use crate::limits::UserLimits;
use fancy_regex::Regex;
use std::collections::HashMap;
use std::sync::Arc;

/// What an operation needs on a resource: RabbitMQ's three permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Create or delete it (queue.declare, queue.delete, exchange.declare, exchange.delete).
    Configure,
    /// Put messages into it (basic.publish to an exchange; the destination of a binding).
    Write,
    /// Take messages out of it (basic.consume, basic.get, queue.purge; the source of a
    /// binding).
    Read,
}

/// Why permissions could not be set, as `rabbitmqctl set_permissions` refuses them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermissionError {
    /// No user of that name.
    #[error("no such user '{0}'")]
    NoUser(String),
    /// No vhost of that name.
    #[error("no such vhost '{0}'")]
    NoVhost(String),
    /// A pattern is not a regular expression.
    #[error("invalid regular expression '{0}'")]
    InvalidPattern(String),
}

/// One of the three patterns: `.*` (what every configured user has on every vhost) matches
/// without a compiled expression, which costs start-up time and memory.
#[derive(Clone, Debug)]
enum Pattern {
    /// `.*`: every name.
    Any,
    /// Any other regular expression.
    Regex(Regex),
}

impl Pattern {
    /// `pattern` as `rabbitmqctl set_permissions` takes it: an empty one matches no name
    /// (RabbitMQ reads it as `^$`).
    fn new(pattern: &str) -> Result<Self, PermissionError> {
        let pattern = match pattern {
            ".*" => return Ok(Self::Any),
            "" => "^$",
            other => other,
        };
        Regex::new(pattern)
            .map(Self::Regex)
            .map_err(|_| PermissionError::InvalidPattern(pattern.to_owned()))
    }

    /// Whether it matches `name`; a pattern that backtracks past its limit on it (a
    /// catastrophic one) matches nothing.
    fn is_match(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Regex(regex) => regex.is_match(name).unwrap_or(false),
        }
    }
}

/// A user's permissions in one vhost.
#[derive(Debug)]
pub(crate) struct Permissions {
    configure: Pattern,
    write: Pattern,
    read: Pattern,
}

impl Permissions {
    /// From the three patterns of `rabbitmqctl set_permissions`.
    pub(crate) fn new(configure: &str, write: &str, read: &str) -> Result<Self, PermissionError> {
        Ok(Self {
            configure: Pattern::new(configure)?,
            write: Pattern::new(write)?,
            read: Pattern::new(read)?,
        })
    }

    /// `.*` for all three.
    pub(crate) fn full() -> Self {
        Self {
            configure: Pattern::Any,
            write: Pattern::Any,
            read: Pattern::Any,
        }
    }

    /// Whether `access` to the resource `name` is allowed (the default exchange is named
    /// `amq.default` here, as in RabbitMQ).
    pub(crate) fn allows(&self, access: Access, name: &str) -> bool {
        let pattern = match access {
            Access::Configure => &self.configure,
            Access::Write => &self.write,
            Access::Read => &self.read,
        };
        pattern.is_match(name)
    }
}

/// A user's topic permissions on one exchange (`rabbitmqctl set_topic_permissions`): what
/// routing keys it may publish with (write) and bind with (read) when that exchange is a
/// topic exchange.
#[derive(Clone, Debug)]
pub(crate) struct TopicPermission {
    write: Pattern,
    read: Pattern,
}

impl TopicPermission {
    /// From `rabbitmqctl set_topic_permissions`'s two patterns, with `{username}` and
    /// `{vhost}` replaced by the user's name and the vhost's (as RabbitMQ expands them, without
    /// escaping); an empty pattern matches only the empty key.
    pub(crate) fn new(
        user: &str,
        vhost: &str,
        write: &str,
        read: &str,
    ) -> Result<Self, PermissionError> {
        let expand = |pattern: &str| {
            Pattern::new(
                &pattern
                    .replace("{username}", user)
                    .replace("{vhost}", vhost),
            )
        };
        Ok(Self {
            write: expand(write)?,
            read: expand(read)?,
        })
    }

    /// Whether the routing key `key` may be published with (write) or bound with (read).
    pub(crate) fn allows(&self, access: Access, key: &str) -> bool {
        match access {
            Access::Write => self.write.is_match(key),
            Access::Read | Access::Configure => self.read.is_match(key),
        }
    }
}

/// A user's topic permissions in one vhost, by exchange name.
pub(crate) type TopicPermissions = HashMap<String, TopicPermission>;

/// A user: credential, and permissions by vhost.
#[derive(Debug)]
struct UserEntry {
    credential: Credential,
    /// From the configuration: granted `.*` on every vhost added.
    configured: bool,
    permissions: HashMap<String, Arc<Permissions>>,
    /// Topic permissions by vhost (none: every routing key is allowed).
    topic_permissions: HashMap<String, Arc<TopicPermissions>>,
    /// Its limits (`rabbitmqctl set_user_limits`).
    limits: UserLimits,
    /// Its tags (`rabbitmqctl set_user_tags`), as given.
    tags: Vec<String>,
}

/// What a login's user tags grant, for the connection's life: as in RabbitMQ, tags are read
/// at login, and a change of them applies to later logins.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TagGrants {
    /// Tagged `impersonator`: may publish with another user's name as `user_id`.
    pub(crate) impersonator: bool,
}

/// Every user of a broker.
#[derive(Debug, Default)]
pub(crate) struct Users {
    users: HashMap<String, UserEntry>,
}

impl Users {
    /// The configured users, with no vhost yet (each vhost added gives them full
    /// permissions: [`Users::vhost_added`]).
    pub(crate) fn new(configured: &[crate::User]) -> Self {
        let users = configured
            .iter()
            .map(|u| {
                let entry = UserEntry {
                    credential: Credential::Password(u.password.clone()),
                    configured: true,
                    permissions: HashMap::new(),
                    topic_permissions: HashMap::new(),
                    limits: UserLimits::default(),
                    tags: u.tags.clone(),
                };
                (u.name.clone(), entry)
            })
            .collect();
        Self { users }
    }

    /// Whether `name` logs in with `password`, and if so what its tags grant.
    pub(crate) fn authenticate(&self, name: &str, password: &str) -> Option<TagGrants> {
        let user = self
            .users
            .get(name)
            .filter(|u| u.credential.verifies(password))?;
        Some(TagGrants {
            impersonator: user.tags.iter().any(|t| t == "impersonator"),
        })
    }

    /// `user`'s tags, if there is such a user.
    pub(crate) fn tags(&self, user: &str) -> Option<&[String]> {
        self.users.get(user).map(|u| u.tags.as_slice())
    }

    /// Replaces `user`'s tags; false if there is no such user.
    pub(crate) fn set_tags(&mut self, user: &str, tags: Vec<String>) -> bool {
        self.users.get_mut(user).map(|u| u.tags = tags).is_some()
    }

    /// The users' names, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.users.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    /// Whether there is a user of that name.
    pub(crate) fn exists(&self, name: &str) -> bool {
        self.users.contains_key(name)
    }

    /// `user`'s permissions in `vhost`, if it has any.
    pub(crate) fn permissions(&self, user: &str, vhost: &str) -> Option<Arc<Permissions>> {
        self.users.get(user)?.permissions.get(vhost).cloned()
    }

    /// Adds a user without permissions; false if one has that name.
    pub(crate) fn add(&mut self, name: &str, password: &str) -> bool {
        if self.users.contains_key(name) {
            return false;
        }
        self.put(name, Credential::Password(password.to_owned()), Vec::new());
        true
    }

    /// Adds a user without permissions, or gives an existing one a new credential and tags
    /// (keeping its permissions and limits), as a definitions import does.
    pub(crate) fn put(&mut self, name: &str, credential: Credential, tags: Vec<String>) {
        match self.users.get_mut(name) {
            Some(user) => {
                user.credential = credential;
                user.tags = tags;
            }
            None => {
                let entry = UserEntry {
                    credential,
                    configured: false,
                    permissions: HashMap::new(),
                    topic_permissions: HashMap::new(),
                    limits: UserLimits::default(),
                    tags,
                };
                self.users.insert(name.to_owned(), entry);
            }
        }
    }

    /// Deletes a user; false if there is none of that name.
    pub(crate) fn delete(&mut self, name: &str) -> bool {
        self.users.remove(name).is_some()
    }

    /// Sets (`Some`) or clears (`None`) `user`'s permissions in `vhost`.
    pub(crate) fn set(
        &mut self,
        user: &str,
        vhost: &str,
        permissions: Option<Permissions>,
    ) -> Result<(), PermissionError> {
        let entry = self
            .users
            .get_mut(user)
            .ok_or_else(|| PermissionError::NoUser(user.to_owned()))?;
        match permissions {
            Some(p) => entry.permissions.insert(vhost.to_owned(), Arc::new(p)),
            None => entry.permissions.remove(vhost),
        };
        Ok(())
    }

    /// `user`'s limits (none for a user that does not exist).
    pub(crate) fn limits(&self, user: &str) -> UserLimits {
        self.users.get(user).map(|u| u.limits).unwrap_or_default()
    }

    /// Sets `user`'s limits; false if there is no such user.
    pub(crate) fn set_limits(&mut self, user: &str, limits: UserLimits) -> bool {
        self.users
            .get_mut(user)
            .map(|u| u.limits = limits)
            .is_some()
    }

    /// `user`'s topic permissions in `vhost`, if it has any.
    pub(crate) fn topic_permissions(
        &self,
        user: &str,
        vhost: &str,
    ) -> Option<Arc<TopicPermissions>> {
        self.users.get(user)?.topic_permissions.get(vhost).cloned()
    }

    /// Sets (`Some`) or clears (`None`) `user`'s topic permissions on `exchange` in `vhost`,
    /// or clears all of them there (`exchange` `None`).
    pub(crate) fn set_topic(
        &mut self,
        user: &str,
        vhost: &str,
        exchange: Option<&str>,
        permission: Option<TopicPermission>,
    ) -> Result<(), PermissionError> {
        let entry = self
            .users
            .get_mut(user)
            .ok_or_else(|| PermissionError::NoUser(user.to_owned()))?;
        let Some(exchange) = exchange else {
            entry.topic_permissions.remove(vhost);
            return Ok(());
        };
        // Connections hold the current map: a changed copy replaces it.
        let mut changed = entry
            .topic_permissions
            .get(vhost)
            .map(|topics| TopicPermissions::clone(topics))
            .unwrap_or_default();
        match permission {
            Some(permission) => changed.insert(exchange.to_owned(), permission),
            None => changed.remove(exchange),
        };
        if changed.is_empty() {
            entry.topic_permissions.remove(vhost);
        } else {
            entry
                .topic_permissions
                .insert(vhost.to_owned(), Arc::new(changed));
        }
        Ok(())
    }

    /// A vhost was added: the configured users get full permissions on it.
    pub(crate) fn vhost_added(&mut self, vhost: &str) {
        let full = Arc::new(Permissions::full());
        for entry in self.users.values_mut().filter(|u| u.configured) {
            entry.permissions.insert(vhost.to_owned(), full.clone());
        }
    }

    /// A vhost was deleted: so are the permissions on it.
    pub(crate) fn vhost_deleted(&mut self, vhost: &str) {
        for entry in self.users.values_mut() {
            entry.permissions.remove(vhost);
            entry.topic_permissions.remove(vhost);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_anywhere_and_an_empty_one_matches_nothing() {
        let p = Permissions::new("^cq", "", "rq").expect("valid");
        assert!(p.allows(Access::Configure, "cq1"));
        assert!(!p.allows(Access::Configure, "xcq"));
        assert!(!p.allows(Access::Write, "amq.default"));
        assert!(!p.allows(Access::Write, "anything"));
        assert!(
            p.allows(Access::Read, "my-rq-2"),
            "unanchored, as PCRE's re:run"
        );
        assert!(Permissions::full().allows(Access::Write, ""));
        // `.*` compiles nothing: every configured user holds it for every vhost, and three
        // compiled expressions cost a broker's start ~0.5 ms and ~1.5 MB (warren-bench).
        let full = Permissions::new(".*", ".*", ".*").expect("valid");
        assert!(matches!(
            [full.configure, full.write, full.read],
            [Pattern::Any, Pattern::Any, Pattern::Any]
        ));
        assert_eq!(
            Permissions::new("(", ".*", ".*").err(),
            Some(PermissionError::InvalidPattern("(".into()))
        );
    }

    #[test]
    fn a_pattern_that_backtracks_past_its_limit_matches_nothing() {
        // A back-reference needs the backtracking engine; nested repeats then take
        // exponential time on a name that almost matches, until the step limit stops them.
        let p = Permissions::new(r"^(a|a?)+\1b$", "", "").expect("valid");
        assert!(p.allows(Access::Configure, "aab"));
        let name = "a".repeat(64);
        let Pattern::Regex(regex) = &p.configure else {
            panic!("compiled")
        };
        assert!(regex.is_match(&name).is_err(), "the limit is reached");
        assert!(!p.allows(Access::Configure, &name));
    }

    #[test]
    fn topic_patterns_expand_username_and_vhost_and_an_empty_one_takes_the_empty_key() {
        let p = TopicPermission::new("ann", "prod", r"^{username}\.{vhost}\.", "").expect("valid");
        assert!(p.allows(Access::Write, "ann.prod.x"));
        assert!(!p.allows(Access::Write, "bob.prod.x"));
        assert!(p.allows(Access::Read, ""));
        assert!(!p.allows(Access::Read, "ann.prod.x"));
        assert_eq!(
            TopicPermission::new("ann", "/", "(", "").err(),
            Some(PermissionError::InvalidPattern("(".into()))
        );
        // `{client_id}`, which only MQTT fills in, is literal text.
        let p = TopicPermission::new("ann", "/", r"^{client_id}\.", "").expect("valid");
        assert!(p.allows(Access::Write, "{client_id}.x"));
        assert!(!p.allows(Access::Write, "c1.x"));
        let mut users = Users::new(&[]);
        users.add("ann", "p");
        let set = |users: &mut Users, exchange, permission| {
            users
                .set_topic("ann", "/", exchange, permission)
                .expect("user exists")
        };
        let any = || TopicPermission::new("ann", "/", ".*", ".*").ok();
        set(&mut users, Some("x"), any());
        set(&mut users, Some("y"), any());
        set(&mut users, Some("x"), None);
        let topics = users.topic_permissions("ann", "/").expect("y's are left");
        assert_eq!(
            (topics.contains_key("x"), topics.contains_key("y")),
            (false, true)
        );
        set(&mut users, None, None);
        assert!(users.topic_permissions("ann", "/").is_none());
    }

    #[test]
    fn configured_users_get_every_vhost_added_later_and_others_nothing() {
        let mut users = Users::new(&[crate::User::new("guest", "guest")]);
        users.vhost_added("/");
        assert!(users.add("probe", "secret"));
        assert!(!users.add("probe", "other"), "exists");
        assert!(users.authenticate("probe", "secret").is_some());
        assert!(users.authenticate("probe", "guest").is_none());
        users.vhost_added("v");
        assert!(users.permissions("guest", "v").is_some());
        assert!(users.permissions("probe", "v").is_none());
        users.vhost_deleted("v");
        assert!(users.permissions("guest", "v").is_none());
        assert_eq!(
            users.set("nobody", "/", None),
            Err(PermissionError::NoUser("nobody".into()))
        );
    }
}
