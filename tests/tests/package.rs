//! The Debian package as `scripts/package` builds it (the test command packages the
//! dev build): its control data and files, the systemd unit `systemd-analyze` accepts,
//! and the installed binary started as the unit starts it, with the packaged config,
//! as an unprivileged user, telling systemd it is ready.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weir_tests::{Broker, EM_AARCH64, elf_machine, emulated_aarch64, run, signal, wait_bounded};

/// The package for `arch` (amd64, arm64) in the target directory's debian/.
fn package(arch: &str) -> PathBuf {
    // cargo-deb writes into the target directory, wherever CARGO_TARGET_DIR puts it.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("debian");
    let found = std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("weir_") && n.ends_with(&format!("_{arch}.deb")))
        });
    found.unwrap_or_else(|| {
        panic!(
            "no weir_*_{arch}.deb in {}: run scripts/package first (./scripts/test does)",
            dir.display()
        )
    })
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = run(
        Command::new("dpkg-deb").args(args).arg(deb),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "dpkg-deb {args:?}: {}", out.stderr);
    out.stdout
}

#[test]
fn the_debian_package_installs_a_hardened_notify_service() {
    let deb = package("amd64");

    // Control data: name, architecture, the adduser the postinst needs, the conffile,
    // and a postinst that makes the `weir` system user and enables the unit.
    let info = dpkg_deb(&["--info"], &deb);
    for field in ["Package: weir", "Architecture: amd64", "Section: net"] {
        assert!(info.contains(field), "{field}: {info}");
    }
    assert!(
        info.lines()
            .any(|l| l.trim().starts_with("Depends:") && l.contains("adduser")),
        "{info}"
    );
    let control_file = |name: &str| {
        let out = run(
            Command::new("dpkg-deb").arg("--info").arg(&deb).arg(name),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "{name}: {}", out.stderr);
        out.stdout
    };
    assert_eq!(control_file("conffiles").trim(), "/etc/weir/weir.toml");
    let postinst = control_file("postinst");
    assert!(postinst.contains("adduser --system --group"), "{postinst}");
    assert!(
        postinst.contains("deb-systemd-helper enable weir.service"),
        "{postinst}"
    );

    // Files: the binary, the config readable by root and the weir group only, the unit.
    let contents = dpkg_deb(&["--contents"], &deb);
    let entry = |path: &str| {
        contents
            .lines()
            .find(|l| l.ends_with(path))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{contents}"))
            .to_string()
    };
    assert!(entry("./usr/bin/weir").starts_with("-rwxr-xr-x"));
    assert!(entry("./etc/weir/weir.toml").starts_with("-rw-r-----"));
    assert!(entry("./usr/lib/systemd/system/weir.service").starts_with("-rw-r--r--"));

    // Installed into a throwaway root.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let out = run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let unit_path = root.join("usr/lib/systemd/system/weir.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/weir serve --config /etc/weir/weir.toml",
        "WatchdogSec=30",
        "Restart=on-failure",
        "User=weir",
        "StateDirectory=weir",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(unit.contains(line), "{line:?} missing from the unit");
    }
    assert!(
        !unit.contains("\nMemoryDenyWriteExecute"),
        "breaks the plugins' JIT"
    );
    let config = root.join("etc/weir/weir.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\ndata_dir = \"/var/lib/weir\"\n"));

    // systemd accepts the unit. It names /usr/bin/weir, which this machine does not
    // have, so a copy pointing into the throwaway root is what is verified.
    let checked = tmp.path().join("weir.service");
    let binary = root.join("usr/bin/weir");
    std::fs::write(
        &checked,
        unit.replace("/usr/bin/weir", binary.to_str().unwrap()),
    )
    .unwrap();
    let out = run(
        Command::new("systemd-analyze").arg("verify").arg(&checked),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success() && out.stderr.trim().is_empty(),
        "systemd-analyze verify: {}{}",
        out.stdout,
        out.stderr
    );
    let out = run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(&checked),
        Duration::from_secs(60),
    );
    let exposure = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .find_map(|l| l.split("Overall exposure level for weir.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level: {}{}", out.stdout, out.stderr));
    assert!(exposure <= 3.5, "exposure {exposure} (0 best, 10 worst)");

    // The installed binary, started as the unit starts it: the packaged config, a
    // notify socket and a watchdog, an unprivileged user (nobody, standing in for the
    // `weir` user the postinst makes), a state directory it owns. Loopback listeners
    // instead of the packaged 0.0.0.0 ones, and the state directory in the throwaway
    // root instead of /var/lib/weir.
    let state = root.join("var/lib/weir");
    std::fs::create_dir_all(&state).unwrap();
    let as_root = running_as_root();
    let socket_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut command = if as_root {
        for path in [tmp.path(), &root, &root.join("etc/weir")] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o777)).unwrap();
        chown(&state, "nobody:nogroup");
        chown(&config, "root:nogroup");
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--no-new-privs",
        ])
        .arg(&binary);
        c
    } else {
        Command::new(&binary)
    };
    command
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "30000000");
    let mut broker = Broker::start_with(
        &mut command,
        &state,
        &["--config", config.to_str().unwrap()],
    );
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).expect("READY=1 within 60 s");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim_end(), "READY=1");
    let database = std::fs::metadata(state.join("weir.redb")).expect("the database");
    if as_root {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(database.uid(), 65534, "written by nobody, not root");
    }
    signal(&broker.child, "TERM");
    assert!(wait_bounded(&mut broker.child, Duration::from_secs(60)).success());
}

/// The arm64 package (`scripts/package --target aarch64-unknown-linux-gnu`) holds the
/// aarch64 binary, which runs (under qemu here) and needs no more than the glibc of
/// Ubuntu 22.04 (2.35; Debian 12 and Raspberry Pi OS have 2.36), and the system's
/// OpenSSL (libssl3), which the package depends on.
#[test]
fn the_arm64_package_holds_a_working_aarch64_binary() {
    let deb = package("arm64");
    let info = dpkg_deb(&["--info"], &deb);
    assert!(info.contains("Architecture: arm64"), "{info}");
    let depends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .unwrap_or_else(|| panic!("no Depends: {info}"));
    assert!(depends.contains("libssl3"), "{depends}");
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tmp.path()),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let binary = tmp.path().join("usr/bin/weir");
    assert_eq!(elf_machine(&binary), EM_AARCH64);
    let out = run(
        emulated_aarch64(&binary).arg("--version"),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.starts_with("weir "), "{}", out.stdout);
    let symbols = run(
        Command::new("aarch64-linux-gnu-objdump")
            .arg("-T")
            .arg(&binary),
        Duration::from_secs(60),
    );
    assert!(symbols.status.success(), "{}", symbols.stderr);
    let newest = symbols
        .stdout
        .split_whitespace()
        .filter_map(|w| w.trim_matches(['(', ')']).strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|n| n.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .expect("glibc symbol versions");
    assert!(newest <= (2, 35), "needs glibc {newest:?}");
    let headers = run(
        Command::new("aarch64-linux-gnu-objdump")
            .arg("-p")
            .arg(&binary),
        Duration::from_secs(60),
    );
    let needed: Vec<&str> = headers
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("NEEDED"))
        .map(str::trim)
        .collect();
    assert!(needed.contains(&"libssl.so.3"), "{needed:?}");
}

fn chown(path: &Path, owner: &str) {
    let status = Command::new("chown").arg(owner).arg(path).status().unwrap();
    assert!(status.success(), "chown {owner} {}", path.display());
}

/// Whether this test runs as root (CI does): then the broker runs as nobody.
fn running_as_root() -> bool {
    run(Command::new("id").arg("-u"), Duration::from_secs(10))
        .stdout
        .trim()
        == "0"
}
