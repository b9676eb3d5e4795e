//! etcd credentials: a username and a password that never prints.

use std::{fmt, path::Path};

use crate::error::{Error, Result};

/// A string that must not be printed: `Debug` and `Display` show `<redacted>`. Read it with
/// [`Secret::expose`], only where it is handed to etcd.
#[derive(Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// An etcd username and password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: Secret,
}

impl Credentials {
    /// A username and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: Secret::new(password),
        }
    }

    /// A username, and the password read from a file (one trailing newline is ignored, as a file
    /// written by `echo` or a secrets mount has one).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the file if it cannot be read or is empty.
    pub fn from_password_file(username: impl Into<String>, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::InvalidConfig {
            setting: "etcd-password-file",
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let password = text.strip_suffix('\n').unwrap_or(&text);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            return Err(Error::InvalidConfig {
                setting: "etcd-password-file",
                reason: format!("{} is empty", path.display()),
            });
        }
        Ok(Self::new(username, password))
    }

    /// The username.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The password (redacted when printed).
    pub fn password(&self) -> &Secret {
        &self.password
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let credentials = Credentials::new("alice", "hunter2");
        assert!(!format!("{credentials:?}").contains("hunter2"));
        assert_eq!(credentials.password().to_string(), "<redacted>");
        assert_eq!(credentials.password().expose(), "hunter2");
    }

    #[test]
    fn password_files_lose_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let credentials = Credentials::from_password_file("u", &path).unwrap();
        assert_eq!(credentials.password().expose(), "s3cret");
        std::fs::write(&path, "").unwrap();
        let e = Credentials::from_password_file("u", &path).unwrap_err();
        assert!(e.to_string().contains("is empty"));
    }
}
