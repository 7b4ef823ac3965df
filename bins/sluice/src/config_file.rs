//! Which config file a command reads: `--config` / `-c` (the older `--file` still works),
//! else `./sluice.toml` when it exists, else `$SLUICE_CONFIG`.

use std::path::PathBuf;

use sluice_core::{Config, Error};

/// The config file option every command that reads the config takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigFile {
    /// The config file [default: ./sluice.toml if it exists, else $SLUICE_CONFIG]
    #[arg(short = 'c', long = "config", alias = "file", value_name = "FILE")]
    config: Option<PathBuf>,
}

/// The file read when no option names one.
pub const DEFAULT: &str = "sluice.toml";

impl ConfigFile {
    /// The file to read.
    pub fn path(&self) -> Result<PathBuf, Error> {
        if let Some(path) = &self.config {
            return Ok(path.clone());
        }
        let default = PathBuf::from(DEFAULT);
        if default.exists() {
            return Ok(default);
        }
        match std::env::var_os("SLUICE_CONFIG") {
            Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
            _ => Err(Error::configuration(
                format!("no config file: there is no ./{DEFAULT} and SLUICE_CONFIG is not set"),
                "pass --config FILE, set SLUICE_CONFIG, or write a starter file with `sluice init`",
            )),
        }
    }

    /// The file's path and the config that runs (environment variables substituted, and the
    /// entities created through the API added); a file that cannot be read or parsed is an
    /// error located by `file:line:column`.
    pub fn load(&self) -> Result<(PathBuf, Config), Error> {
        let path = self.path()?;
        let config = Config::load_running(&path).map_err(Error::invalid)?;
        Ok((path, config))
    }
}
