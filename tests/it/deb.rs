//! Packaging: `scripts/deb` builds the Debian package with cargo-deb (from
//! the debug build the tests already have), its file list holds what the
//! README promises, and it installs with dpkg and runs, and `man` finds a
//! page per command.

use std::process::Command;

use crate::support::system_dirs;

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_builds_lists_its_files_installs_and_runs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let has_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_deb,
        "cargo-deb is missing: run scripts/test (scripts/install-deps installs it)"
    );
    assert!(
        std::path::Path::new("/usr/bin/dpkg").exists(),
        "dpkg is missing: this test needs Debian; run scripts/test there"
    );
    let out = sh(Command::new(format!("{root}/scripts/deb"))
        .env("PROFILE", "dev")
        .env("NO_BUILD", "1"));
    let deb = out.lines().last().unwrap().trim().to_string();
    assert!(deb.ends_with(".deb") && std::path::Path::new(&deb).exists(), "{out}");

    let list = sh(Command::new("dpkg-deb").args(["-c", &deb]));
    for f in [
        "./usr/bin/mailproxy",
        "./usr/share/man/man1/mailproxy.1",
        "./usr/share/man/man1/mailproxy-login.1",
        "./usr/share/man/man1/mailproxy-add.1",
        "./usr/share/man/man1/mailproxy-open.1",
        "./usr/share/man/man1/mailproxy-token.1",
        "./usr/share/man/man1/mailproxy-service-install.1",
        "./usr/share/bash-completion/completions/mailproxy",
        "./usr/share/zsh/vendor-completions/_mailproxy",
        "./usr/share/fish/vendor_completions.d/mailproxy.fish",
        "./usr/lib/systemd/user/mailproxy.service",
        "./usr/share/doc/mailproxy/examples/config.toml",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(f) || l.ends_with(&format!("{f}.gz"))),
            "{f} in\n{list}"
        );
    }
    let info = sh(Command::new("dpkg-deb").args(["-f", &deb, "Package", "Version"]));
    assert!(info.contains("Package: mailproxy"), "{info}");

    // SAFETY: geteuid has no preconditions.
    let root_user = rustix::process::geteuid().is_root();
    let dpkg = |args: &[&str]| {
        let mut c = if root_user {
            Command::new("dpkg")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "dpkg"]);
            c
        };
        c.args(args);
        sh(&mut c)
    };
    // The package is installed from here to `dpkg -r`.
    let system = system_dirs();
    dpkg(&["-i", &deb]);
    let version = Command::new("/usr/bin/mailproxy").arg("--version").output();
    let unit = std::fs::read_to_string("/usr/lib/systemd/user/mailproxy.service");
    let man = |args: &[&str]| {
        Command::new("man")
            .args(args)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
    };
    let (where_login, login_page) = (man(&["-w", "mailproxy-login"]), man(&["mailproxy-login"]));
    dpkg(&["-r", "mailproxy"]);
    drop(system);
    let version = version.unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        format!("mailproxy {}\n", env!("CARGO_PKG_VERSION"))
    );
    // `man mailproxy-login` as a person types it, from the installed package.
    let where_login = where_login.expect("man (Debian's man-db)");
    assert_eq!(
        String::from_utf8_lossy(&where_login.stdout),
        "/usr/share/man/man1/mailproxy-login.1.gz\n",
        "{}",
        String::from_utf8_lossy(&where_login.stderr)
    );
    let login_page = login_page.unwrap();
    let page = String::from_utf8_lossy(&login_page.stdout);
    assert!(login_page.status.success(), "{page}");
    // man justifies its lines: compare the words.
    let words = page.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "NAME mailproxy-login - Authorise an account at its provider",
        "--no-browser Print the URL only",
        "EXAMPLES mailproxy login alice@gmail.com Asks for the local password",
        "SEE ALSO mailproxy(1)",
    ] {
        assert!(words.contains(want), "{want:?} in\n{page}");
    }
    let unit = unit.unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/mailproxy serve\n"), "{unit}");
    assert!(
        !std::path::Path::new("/usr/bin/mailproxy").exists(),
        "dpkg -r removed it"
    );
}
