//! The configuration file of `talkgroup serve --config FILE`: one flat TOML table whose keys are the
//! long options of `serve` with `_` for `-` (`http = "127.0.0.1:8080"`, `media_port = 40000`,
//! `store = "redis"`, `rtp_allow = ["10.0.0.0/8"]`, `no_pin = true`).
//!
//! There is one source of truth for what an option is called, what it accepts and what it defaults to:
//! the clap definition of [`ServeArgs`](super::ServeArgs). A file is checked against that definition —
//! every key must be one of its long options, every value must pass that option's own value parser —
//! and its values then become the options' *defaults* before the command line is parsed. So the
//! precedence is clap's own: flags > environment > file > built-in defaults, with nothing merged by
//! hand. Errors name the key and the line.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command};
use thiserror::Error;
use toml::de::{DeTable, DeValue};

/// Options that have no place in a file (`config` itself, and clap's own).
const NOT_IN_FILE: [&str; 3] = ["config", "help", "version"];

/// What is wrong with a configuration file.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML (the parser's message names the line and column).
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The TOML parser's message.
        message: String,
    },
    /// A key that is no option of `talkgroup serve`.
    #[error("{path} line {line}: unknown key '{key}'{hint}")]
    UnknownKey {
        /// The file.
        path: String,
        /// The key's line (1-based).
        line: usize,
        /// The key as written.
        key: String,
        /// A suggestion, or where the keys are listed.
        hint: String,
    },
    /// A value the option does not accept.
    #[error("{path} line {line}: {key}: {message}")]
    BadValue {
        /// The file.
        path: String,
        /// The key's line (1-based).
        line: usize,
        /// The key.
        key: String,
        /// What is wrong with the value.
        message: String,
    },
}

/// One checked setting of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The key as written (`media_port`).
    pub key: String,
    /// The clap argument it sets.
    pub id: String,
    /// The line of the key (1-based).
    pub line: usize,
    /// The value as clap takes it on the command line (lists joined with the option's delimiter).
    pub value: String,
}

/// A checked configuration file.
#[derive(Debug, Clone, Default)]
pub struct FileConfig {
    /// The file's name, for messages.
    pub path: String,
    /// Its settings, in the order of the file.
    pub settings: Vec<Setting>,
}

impl FileConfig {
    /// Reads and checks `path` against the `serve` command's options.
    pub fn load(path: &Path, serve: &Command) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        FileConfig::parse(&path.display().to_string(), &text, serve)
    }

    /// Checks the TOML `text` (named `path` in messages) against the `serve` command's options.
    pub fn parse(path: &str, text: &str, serve: &Command) -> Result<FileConfig, ConfigError> {
        let table = DeTable::parse(text).map_err(|e| ConfigError::Syntax {
            path: path.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let options: BTreeMap<String, &Arg> = serve
            .get_arguments()
            .filter_map(|a| Some((a.get_long()?.replace('-', "_"), a)))
            .filter(|(key, _)| !NOT_IN_FILE.contains(&key.as_str()))
            .collect();
        let mut settings = Vec::new();
        for (key, value) in table.get_ref().iter() {
            let line = line_of(text, key.span().start);
            let key = key.get_ref().to_string();
            let Some(arg) = options.get(&key) else {
                return Err(ConfigError::UnknownKey {
                    path: path.to_string(),
                    line,
                    hint: hint(&key, &options),
                    key,
                });
            };
            let bad = |message: String| ConfigError::BadValue {
                path: path.to_string(),
                line,
                key: key.clone(),
                message,
            };
            let value = to_clap_value(arg, value.get_ref()).map_err(bad)?;
            check_value(arg, &value).map_err(bad)?;
            settings.push(Setting {
                id: arg.get_id().to_string(),
                key,
                line,
                value,
            });
        }
        settings.sort_by_key(|s| s.line);
        Ok(FileConfig {
            path: path.to_string(),
            settings,
        })
    }

    /// The `serve` command with the file's values as its options' defaults (so the environment and the
    /// command line still win).
    pub fn apply(&self, mut serve: Command) -> Command {
        for s in &self.settings {
            let value = s.value.clone();
            serve = serve.mut_arg(&s.id, move |a| a.default_value(value));
        }
        serve
    }

    /// The setting for clap argument `id`, if the file has one.
    pub fn setting(&self, id: &str) -> Option<&Setting> {
        self.settings.iter().find(|s| s.id == id)
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// A suggestion for an unknown key.
fn hint(key: &str, options: &BTreeMap<String, &Arg>) -> String {
    let spelled = key.replace('-', "_");
    if options.contains_key(&spelled) {
        return format!(" (keys are written with '_': '{spelled}')");
    }
    if NOT_IN_FILE.contains(&spelled.as_str()) {
        return " (it has no place in a configuration file)".into();
    }
    " (the keys are the long options of `talkgroup serve --help`, with '_' for '-')".into()
}

/// Whether the option is a flag (`--no-pin`): a boolean in the file.
fn is_flag(arg: &Arg) -> bool {
    !arg.get_action().takes_values()
}

/// A TOML value as clap takes it on the command line.
fn to_clap_value(arg: &Arg, value: &DeValue<'_>) -> Result<String, String> {
    if is_flag(arg) {
        return match value {
            DeValue::Boolean(b) => Ok(b.to_string()),
            _ => Err("expects true or false".into()),
        };
    }
    match value {
        DeValue::Array(items) => {
            let Some(delimiter) = arg.get_value_delimiter() else {
                return Err("takes one value, not a list".into());
            };
            let items: Result<Vec<String>, String> =
                items.iter().map(|v| scalar(v.get_ref())).collect();
            Ok(items?.join(&delimiter.to_string()))
        }
        other => scalar(other),
    }
}

/// A string, number or boolean as text.
fn scalar(value: &DeValue<'_>) -> Result<String, String> {
    match value {
        DeValue::String(s) => Ok(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .map(|n| n.to_string())
            .map_err(|_| format!("{i} is out of range")),
        DeValue::Float(f) => Ok(f.to_string()),
        DeValue::Boolean(b) => Ok(b.to_string()),
        DeValue::Datetime(d) => Ok(d.to_string()),
        DeValue::Array(_) => Err("a list inside a list is not a value".into()),
        DeValue::Table(_) => {
            Err("a table is not a value: keys are flat (see talkgroup.example.toml)".into())
        }
    }
}

/// Runs the option's own value parser on `value`: the file accepts exactly what the flag does.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    if is_flag(arg) {
        return Ok(()); // a TOML boolean, already checked
    }
    let Some(long) = arg.get_long() else {
        return Ok(());
    };
    // The option alone, without its environment variable (set or not, it must not stand in for the
    // file's value here).
    let probe = Command::new("talkgroup")
        .no_binary_name(true)
        .arg(arg.clone().env(None).required(false));
    match probe.try_get_matches_from([format!("--{long}={value}")]) {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid value");
            Err(first.trim_start_matches("error: ").to_string())
        }
    }
}

/// The effective settings of `serve` as a TOML file that `--config` accepts again, each line saying
/// where its value came from; secrets are not printed. `serve` is the command as defined (its order is
/// the output's: [`FileConfig::apply`] moves the options it sets to the end), `matches` what was parsed
/// with the file applied.
pub fn render_effective(
    serve: &Command,
    matches: &ArgMatches,
    file: Option<&FileConfig>,
) -> String {
    let mut out = String::from(
        "# talkgroup serve: effective configuration (flags > environment > file > defaults)\n",
    );
    for arg in serve.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let key = long.replace('-', "_");
        if NOT_IN_FILE.contains(&key.as_str()) || arg.is_hide_set() {
            continue;
        }
        let id = arg.get_id().as_str();
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "command line".to_string(),
            Some(ValueSource::EnvVariable) => match arg.get_env() {
                Some(var) => format!("environment: {}", var.to_string_lossy()),
                None => "environment".to_string(),
            },
            _ => match file.and_then(|f| f.setting(id).map(|s| (f, s))) {
                Some((f, s)) => format!("{} line {}", f.path, s.line),
                None => "default".to_string(),
            },
        };
        if values.is_empty() {
            let _ = writeln!(out, "# {key} = (not set)");
        } else if arg.is_hide_env_values_set() {
            let _ = writeln!(out, "# {key} = (set, not shown)  # {source}");
        } else {
            let value = if arg.get_value_delimiter().is_some() {
                let items: Vec<String> = values.iter().map(|v| toml_scalar(v)).collect();
                format!("[{}]", items.join(", "))
            } else {
                toml_scalar(&values.join(","))
            };
            let _ = writeln!(out, "{key} = {value}  # {source}");
        }
    }
    out
}

/// A value as TOML: numbers and booleans bare, everything else a string.
fn toml_scalar(v: &str) -> String {
    if v.parse::<i64>().is_ok() || v == "true" || v == "false" {
        v.to_string()
    } else {
        toml::Value::String(v.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServeArgs;
    use clap::{CommandFactory, FromArgMatches};

    fn serve() -> Command {
        ServeArgs::command()
    }

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse("t.toml", text, &serve())
    }

    fn args(file: &FileConfig, argv: &[&str]) -> ServeArgs {
        let cmd = file.apply(serve());
        let m = cmd
            .try_get_matches_from(std::iter::once("serve").chain(argv.iter().copied()))
            .expect("parses");
        ServeArgs::from_arg_matches(&m).expect("valid")
    }

    #[test]
    fn a_file_sets_options_and_flags_win() {
        let f = parse(
            "http = \"127.0.0.1:9090\"\nmedia_port = 41000\nstore = \"redis\"\nno_pin = true\n\
             rtp_allow = [\"10.0.0.0/8\", \"192.0.2.7\"]\ndrain_timeout = \"5s\"\nmax_queued_bytes = 4096\n",
        )
        .expect("valid");
        let a = args(&f, &[]);
        assert_eq!(a.http.to_string(), "127.0.0.1:9090");
        assert_eq!(a.media_port, 41000);
        assert_eq!(a.store, crate::config::StoreKind::Redis);
        assert!(a.no_pin);
        assert_eq!(a.rtp_allow.len(), 2);
        assert_eq!(a.drain_timeout, std::time::Duration::from_secs(5));
        assert_eq!(a.limits.max_queued_bytes, 4096);
        let a = args(&f, &["--media-port", "42000", "--store", "memory"]);
        assert_eq!(
            (a.media_port, a.store),
            (42000, crate::config::StoreKind::Memory)
        );
        assert_eq!(
            a.http.to_string(),
            "127.0.0.1:9090",
            "the rest stays from the file"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_the_line() {
        let e = parse("http = \"127.0.0.1:1\"\n\nmedia-port = 4\n").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("line 3") && text.contains("'media-port'"),
            "{text}"
        );
        assert!(text.contains("media_port"), "suggests the spelling: {text}");
        let e = parse("# c\nbogus = 1\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("'bogus'"), "{e}");
        let e = parse("store = \"memory\"\nmedia_port = \"high\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml line 2: media_port:"), "{e}");
        assert!(e.contains("high"), "{e}");
        let e = parse("store = \"mongo\"\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("mongo"), "{e}");
        let e = parse("no_pin = \"yes\"\n").unwrap_err().to_string();
        assert!(e.contains("true or false"), "{e}");
        let e = parse("http = [\"a\", \"b\"]\n").unwrap_err().to_string();
        assert!(e.contains("not a list"), "{e}");
        let e = parse("[limits]\nmax_queued_bytes = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'limits'"), "{e}");
        let e = parse("config = \"x.toml\"\n").unwrap_err().to_string();
        assert!(e.contains("no place"), "{e}");
        let e = parse("http = \n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "syntax errors say where: {e}");
    }

    #[test]
    fn the_effective_configuration_is_a_file_that_loads_again() {
        let f = parse("media_port = 41000\ncluster_secret = \"s3cret\"\n").expect("valid");
        let cmd = f.apply(serve());
        let m = cmd
            .clone()
            .try_get_matches_from(["serve", "--shards", "3"])
            .expect("parses");
        let text = render_effective(&cmd, &m, Some(&f));
        assert!(
            text.contains("media_port = 41000  # t.toml line 1"),
            "{text}"
        );
        assert!(text.contains("shards = 3  # command line"), "{text}");
        assert!(
            text.contains("http = \"0.0.0.0:8080\"  # default"),
            "{text}"
        );
        let first = text.lines().nth(1).unwrap_or_default();
        assert!(
            first.starts_with("# config") || first.starts_with("http"),
            "in the options' order: {text}"
        );
        assert!(!text.contains("s3cret"), "secrets are not printed: {text}");
        let again = parse(&text).expect("the output is a valid file");
        assert_eq!(args(&again, &[]).media_port, 41000);
        assert_eq!(args(&again, &[]).shards, Some(3));
    }

    #[test]
    fn the_example_file_in_the_repository_is_valid() {
        let text = include_str!("../../deploy/talkgroup.toml");
        let f = parse(text).expect("the example config is valid");
        assert!(f.setting("http").is_some());
    }
}
