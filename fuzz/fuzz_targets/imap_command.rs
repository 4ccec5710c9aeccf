//! `imap::command::parse_command` / `parse_tag` on arbitrary bytes.
//!
//! Invariants beyond "never panics":
//! * a parsed tag is non-empty and made of tag characters (so it can be
//!   echoed in a reply without injection), and equals `parse_tag`'s answer;
//! * an error's tag, if any, is likewise safe to echo;
//! * command / mechanism names are upper-cased atoms;
//! * `Debug` never shows LOGIN credentials or a SASL initial response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailproxy::imap::command::{is_atom_char, is_tag_char, parse_command, parse_tag, Command, CommandBody};
use zeroize::Zeroizing;

fn check_tag(t: &str) {
    assert!(!t.is_empty(), "empty tag");
    assert!(t.bytes().all(is_tag_char), "tag with non-tag chars: {t:?}");
}

fuzz_target!(|data: &[u8]| {
    let pt = parse_tag(data);
    if let Some(t) = &pt {
        check_tag(t);
    }
    match parse_command(data) {
        Ok(cmd) => {
            check_tag(&cmd.tag);
            assert_eq!(pt.as_deref(), Some(cmd.tag.as_str()));
            let dbg = format!("{cmd:?}");
            match &cmd.body {
                CommandBody::Login { .. } => {
                    // Debug output must not depend on the credentials at all.
                    let dummy = Command {
                        tag: cmd.tag.clone(),
                        body: CommandBody::Login { username: Zeroizing::new("u".into()), password: Zeroizing::new("p".into()) },
                    };
                    assert_eq!(dbg, format!("{dummy:?}"), "Debug leaks LOGIN credentials");
                }
                CommandBody::Authenticate { mechanism, initial_response } => {
                    assert!(!mechanism.is_empty());
                    assert!(mechanism.bytes().all(|c| is_atom_char(c) && !c.is_ascii_lowercase()));
                    if let Some(ir) = initial_response {
                        assert!(ir.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=')));
                        let dummy = Command {
                            tag: cmd.tag.clone(),
                            body: CommandBody::Authenticate { mechanism: mechanism.clone(), initial_response: Some(Zeroizing::new("x".into())) },
                        };
                        assert_eq!(dbg, format!("{dummy:?}"), "Debug leaks the SASL-IR");
                    }
                }
                CommandBody::Other { name } => {
                    assert!(!name.is_empty());
                    assert!(name.bytes().all(|c| is_atom_char(c) && !c.is_ascii_lowercase()), "{name:?}");
                }
                CommandBody::Capability | CommandBody::Noop | CommandBody::Logout | CommandBody::StartTls => {
                    // No arguments: the command must end right after the name.
                    assert!(data.ends_with(b"\n"));
                }
                CommandBody::Id(_) => {}
            }
        }
        Err(e) => {
            if let Some(t) = &e.tag {
                check_tag(t);
            }
            assert!(!e.message.contains('\r') && !e.message.contains('\n'));
        }
    }
});
