//! `entitle-mailsink`: a local SMTP server for trying Entitle out. Every
//! message is written as an `.eml` file to a folder and summarised on stdout,
//! so the codes emailed by a local run can be read.

use std::{path::PathBuf, sync::Arc};

use entitle_tests::smtp::SmtpSink;

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .map(|p| p.parse().expect("usage: entitle-mailsink [PORT] [FOLDER]"))
        .unwrap_or(2525);
    let folder = PathBuf::from(args.next().unwrap_or_else(|| "var/mail".to_owned()));
    std::fs::create_dir_all(&folder).expect("the mail folder can be created");
    let out = folder.clone();
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _sink = SmtpSink::start_on(
        port,
        Some(Arc::new(move |mail| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
            let path = out.join(format!("{stamp}-{n:04}.eml"));
            if let Err(e) = std::fs::write(&path, &mail.raw) {
                eprintln!("could not write {}: {e}", path.display());
                return;
            }
            println!(
                "mail to {} — \"{}\" — saved as {}",
                mail.to.join(", "),
                mail.subject(),
                path.display()
            );
        })),
    );
    println!(
        "entitle-mailsink: SMTP on 127.0.0.1:{port}, messages saved in {}",
        folder.display()
    );
    loop {
        std::thread::park();
    }
}
