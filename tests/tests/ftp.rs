//! The FTP filter end to end: transparent interception of the control
//! connection, real clients (curl, lftp, ftplib) against vsftpd, active and
//! passive, kernel and user mode, and the bounce attempts refused.

use std::path::PathBuf;

use firewall_tests::{
    daemon::LabRun,
    ftp::{check, sha256, Client, FtpServer},
};

fn scratch(run: &LabRun, name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", run.lab.prefix))
}

#[test]
fn every_client_downloads_lists_and_uploads_in_kernel_mode() {
    let run = LabRun::start("ftpk", &[]);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    let file = server
        .random_file("small.bin", 3 * 1024 * 1024 + 17)
        .unwrap();
    let want = sha256(&file);
    for (i, c) in Client::ALL.iter().enumerate() {
        let got = scratch(&run, &format!("dl{i}"));
        check(c.name(), &c.download(&run.lab.client, "small.bin", &got));
        assert_eq!(sha256(&got), want, "{}", c.name());
        let _ = std::fs::remove_file(&got);
        let listing = c.list(&run.lab.client);
        check(c.name(), &listing);
        assert!(
            String::from_utf8_lossy(&listing.stdout).contains("small.bin"),
            "{}",
            c.name()
        );
        let up = format!("up{i}.bin");
        check(c.name(), &c.upload(&run.lab.client, &file, &up));
        assert_eq!(sha256(&server.uploaded(&up)), want, "{}", c.name());
    }
    let status = run.fw.status();
    eprintln!("{}", status["ftp"]);
    assert!(status["ftp"]["active_opened"].as_u64().unwrap() >= 12);
    assert!(status["ftp"]["passive_opened"].as_u64().unwrap() >= 12);
    assert!(run.fw.counter("redirect_pinhole_established") >= 24);
}
