//! The op table: every op of protocol version 1, once, with its name on
//! the wire and who may call it. `help` lists it, `api::dispatch` matches on
//! it (exhaustively: an op without a handler does not compile), and a test
//! checks protocol.md's tables against it.

/// Protocol version spoken by this server.
pub const PROTOCOL_VERSION: u32 = 1;

/// Who may call an op. Finer rules (own accounts, the session's user) are
/// the handler's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Any connection, logged in or not.
    Anyone,
    /// A logged-in connection.
    User,
    /// A logged-in admin.
    Admin,
}

macro_rules! ops {
    ($($(#[$doc:meta])* $op:ident = $name:literal, $caller:ident;)*) => {
        /// An op of the protocol.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Op {
            $($(#[$doc])* $op,)*
        }

        impl Op {
            /// Every op, in the order `help` lists them.
            pub const ALL: &'static [Op] = &[$(Op::$op),*];
            /// Every op's name, in the same order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// The op's name on the wire.
            #[must_use]
            pub fn name(self) -> &'static str {
                match self {
                    $(Op::$op => $name,)*
                }
            }

            /// Who may call it.
            #[must_use]
            pub fn caller(self) -> Caller {
                match self {
                    $(Op::$op => Caller::$caller,)*
                }
            }

            /// The op named `name`, if there is one.
            #[must_use]
            pub fn parse(name: &str) -> Option<Op> {
                match name {
                    $($name => Some(Op::$op),)*
                    _ => None,
                }
            }
        }
    };
}

ops! {
    Hello = "hello", Anyone;
    Ping = "ping", Anyone;
    /// Whether the journal can commit.
    Health = "health", Anyone;
    Help = "help", Anyone;
    Signup = "signup", Anyone;
    Login = "login", Anyone;
    Auth = "auth", Anyone;
    Whoami = "whoami", User;
    Logout = "logout", User;
    ChangePassword = "change_password", User;
    /// Anyone may ask; the code goes to the user's address.
    ResetPassword = "reset_password", Anyone;
    /// The session's user; a reset: whoever holds the code.
    Confirm = "confirm", Anyone;
    Resend = "resend", Anyone;
    Balance = "balance", User;
    Account = "account", User;
    Transfer = "transfer", User;
    Mint = "mint", Admin;
    CreateAccount = "create_account", Admin;
    History = "history", User;
    GetTransfer = "get_transfer", User;
    Add = "add", Admin;
    DeleteAccount = "delete_account", Admin;
    DeleteReason = "delete_reason", Admin;
    ListAccounts = "list_accounts", Admin;
    Tag = "tag", Admin;
    BulkAdd = "bulk_add", Admin;
    Reap = "reap", Admin;
    Backup = "backup", Admin;
    SetEvents = "set_events", Admin;
    Hold = "hold", User;
    Post = "post", User;
    Void = "void", User;
    Redeem = "redeem", User;
    Redeems = "redeems", Admin;
    MyRedeems = "my_redeems", User;
    DecideRedeem = "decide_redeem", Admin;
    Audit = "audit", Admin;
    Stats = "stats", Admin;
}

impl Op {
    /// Whether the op is a debit the connection's reader batches per shard
    /// (see `shard::Outbox`): other ops first send what it holds.
    #[must_use]
    pub fn is_batched_debit(self) -> bool {
        matches!(self, Op::Transfer | Op::Mint)
    }

    /// How many items a reply to this op may hold at most, for the reply
    /// slots it takes (`limit`: the page asked for, if any).
    #[must_use]
    pub fn page_items(self, limit: Option<u64>) -> Option<usize> {
        use crate::limits::{PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX};
        let asked =
            || limit.map_or(PAGE_LIMIT_DEFAULT, |l| usize::try_from(l).unwrap_or(PAGE_LIMIT_MAX).min(PAGE_LIMIT_MAX));
        match self {
            Op::History | Op::ListAccounts | Op::Redeems => Some(asked()),
            Op::MyRedeems => Some(PAGE_LIMIT_MAX),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_are_unique() {
        for op in Op::ALL {
            assert_eq!(Op::parse(op.name()), Some(*op));
        }
        let mut names = Op::NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Op::ALL.len());
        assert_eq!(Op::parse("no_such_op"), None);
    }

    /// protocol.md's operations table says who may call each op; it must
    /// say what the table here says, and list every op.
    #[test]
    fn protocol_md_lists_every_op_with_its_caller() {
        let doc = include_str!("../../protocol.md");
        let table = doc.split("## Operations").nth(1).expect("an Operations section");
        let mut seen = Vec::new();
        for line in table.lines().take_while(|l| !l.starts_with("### ")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let Some(name) = cells.get(1).and_then(|c| c.strip_prefix('`')).and_then(|c| c.strip_suffix('`')) else {
                continue;
            };
            let op = Op::parse(name).unwrap_or_else(|| panic!("protocol.md lists an unknown op {name}"));
            let who = cells[2];
            let expected = match op.caller() {
                Caller::Anyone => ["anyone", "the session's user", "as `confirm`"].iter().any(|w| who.starts_with(w)),
                Caller::User => !who.starts_with("anyone") && !who.starts_with("admin"),
                Caller::Admin => who == "admin",
            };
            assert!(expected, "protocol.md says {name} is for {who:?}, the table says {:?}", op.caller());
            seen.push(op);
        }
        for op in Op::ALL {
            assert!(seen.contains(op), "protocol.md does not list {}", op.name());
        }
    }
}
