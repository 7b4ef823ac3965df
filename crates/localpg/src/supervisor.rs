//! The supervisor: a child process that stops the server and removes the cluster's directory
//! when the owner drops the [`Cluster`] or dies (even by `kill -9`: it notices its stdin
//! close), and stopping a cluster kept on disk.

use super::*;

/// Stops a cluster made with [`ClusterOptions::keep_at`] and removes its directory.
/// Succeeds when nothing is there.
pub fn stop_kept(dir: &Path) -> Result<bool, Error> {
    let data = dir.join("data");
    if !data.exists() {
        return Ok(false);
    }
    let binaries = Binaries::find()?;
    let user = OsUser::for_server()?;
    let mut stop = binaries.command(&user, "pg_ctl");
    stop.arg("-D")
        .arg(&data)
        .args(["-m", "fast", "-w", "stop"])
        .current_dir(dir);
    // "Not running" is fine: the goal is that nothing runs afterwards.
    let _ = stop.output();
    std::fs::remove_dir_all(dir)
        .map_err(|e| Error::io(format!("removing {}", dir.display()), e))?;
    Ok(true)
}

/// A process that outlives nothing: it waits for its standard input to close (the owner
/// dropped the cluster, or died), then stops the server at once and deletes the files.
pub(crate) fn spawn_supervisor(
    binaries: &Binaries,
    user: &OsUser,
    root: &Path,
) -> Result<(Child, ChildStdin), Error> {
    const SCRIPT: &str = r#"trap '' INT TERM HUP
while read -r _; do :; done
"$0" -D "$1/data" -m immediate -w stop >/dev/null 2>&1
rm -rf "$1""#;
    let mut command = user.command("sh");
    binaries.add_libraries(&mut command);
    let mut child = command
        .arg("-c")
        .arg(SCRIPT)
        .arg(binaries.tool("pg_ctl"))
        .arg(root)
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::io("starting the cluster supervisor", e))?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::io("supervisor stdin", std::io::ErrorKind::BrokenPipe.into()))?;
    Ok((child, stdin))
}
