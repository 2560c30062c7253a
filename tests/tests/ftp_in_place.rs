//! FTP control connections forwarded in place (`[ftp] control =
//! "in-place"`): the datapath forwards the plain lines, the
//! daemon gets the others from it and sends what the filter makes of them;
//! real clients against vsftpd, active and passive, and bounces refused.

use firewall_tests::{
    daemon::LabRun,
    ftp::{bounces_refused, every_client, four_clients_download, FtpServer, IN_PLACE},
};

#[test]
fn every_client_downloads_lists_and_uploads_through_connections_read_in_place() {
    let run = LabRun::with_config("ftpip", IN_PLACE);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    every_client(&run, &server);
    // Nothing intercepted: the control connections were forwarded, and
    // only the lines the filter acts on went to the daemon.
    assert_eq!(run.fw.counter("pass_intercepted"), 0);
    let diverted = run.fw.counter("drop_ftp_diverted");
    assert!(diverted >= 24, "{diverted} segments handed to the daemon");
    assert!(run.fw.counter("redirect_pinhole_established") >= 24);
}

#[test]
fn bounces_are_refused_in_place() {
    let run = LabRun::with_config("ftpipb", IN_PLACE);
    let _server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    // The refused command reaches the server as one it refuses: the client
    // reads the server's 5xx as the answer to its PORT, and the session
    // goes on.
    bounces_refused(&run, "NOOP -> 200");
}

#[test]
fn the_tc_datapath_reads_in_place_too() {
    let run = LabRun::with_config_and_args("ftpiptc", IN_PLACE, &["--xdp-mode", "tc"]);
    let server = FtpServer::start(&run.lab.server, &run.lab.prefix).unwrap();
    let file = server.random_file("tc.bin", 8 * 1024 * 1024 + 5).unwrap();
    four_clients_download(&run, &file, "tc.bin");
    assert_eq!(run.fw.counter("pass_intercepted"), 0);
    assert!(run.fw.counter("drop_ftp_diverted") >= 4);
    assert!(run.fw.status()["interfaces"][0]["xdp_program"] == "tc_forward_internal");
}
