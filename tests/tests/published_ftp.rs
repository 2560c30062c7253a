//! A published FTP server: vsftpd inside, reached from outside at the
//! firewall's external address through the FTP filter in its published role
//! (a full proxy: vsftpd sees the firewall's internal address and checks
//! every data connection against it), passive and active, with curl.

use firewall_tests::{
    daemon::LabRun,
    ftp::{sha256, FtpServer},
    lab::addr,
    traffic::*,
};

#[test]
fn a_published_ftp_server_serves_passive_and_active_clients() {
    let mut run = LabRun::with_config(
        "pubftp",
        &format!(
            "[[publish]]\ntransport = \"tcp\"\nport = 21\nserver = \"{}:21\"\n",
            addr::CLIENT
        ),
    );
    let LabRun { lab, fw, .. } = &mut run;
    prime_neighbours(lab);
    let server = FtpServer::start_inside(&lab.client, &lab.prefix).unwrap();
    let file = server.random_file("pub.bin", 1 << 20).unwrap();
    let want = sha256(&file);
    for (mode, args) in [
        ("EPSV", ""),
        ("PASV", "--disable-epsv"),
        ("EPRT", "--ftp-port -"),
        ("PORT", "--ftp-port - --disable-eprt"),
    ] {
        let dest = std::env::temp_dir().join(format!("{}-pub-{mode}.bin", lab.prefix));
        lab.server
            .sh(&format!(
                "curl -sS --max-time 20 {args} -o {} ftp://{}/pub.bin",
                dest.display(),
                addr::FW_EXTERNAL
            ))
            .unwrap_or_else(|e| panic!("{mode}: {e:#}"));
        assert_eq!(sha256(&dest), want, "{mode}");
        std::fs::remove_file(&dest).ok();
    }
    let ftp = &fw.status()["ftp"];
    assert_eq!(ftp["control_connections"], 4, "{ftp}");
    assert_eq!(ftp["passive_opened"], 2, "{ftp}");
    assert_eq!(ftp["active_opened"], 2, "{ftp}");
    let wall = &fw.status()["wall"];
    assert_eq!(
        wall["published"][0],
        format!("tcp 21 -> {}:21 (FTP filter)", addr::CLIENT),
        "{wall}"
    );
    // An uploaded file arrives whole too (passive).
    let up = std::env::temp_dir().join(format!("{}-pub-up.bin", lab.prefix));
    std::fs::copy(&file, &up).unwrap();
    lab.server
        .sh(&format!(
            "curl -sS --max-time 20 -T {} ftp://{}/incoming/up.bin",
            up.display(),
            addr::FW_EXTERNAL
        ))
        .unwrap();
    assert_eq!(sha256(&server.uploaded("up.bin")), want);
    std::fs::remove_file(&up).ok();
}
