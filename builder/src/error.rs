//! The errors the CLI tells apart: a usage or profile problem (exit status 2) from a build
//! failure (1). Both are markers: an error of their own (`UsageError("--boot 3: ...".into())`),
//! or context over a cause (`e.context(UsageError::in_profile(path))`, or
//! [`ResultExt::in_profile`]), which keeps the cause chain; `error: {e:#}` prints
//! `context: cause: cause`. [`is_usage`] finds them either way.

use std::fmt::Display;
use std::path::Path;

/// A usage problem (exit status 2), as opposed to a build failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    /// Context naming the profile a problem is in: prints `PROFILE: cause: ...`.
    pub fn in_profile(path: &Path) -> UsageError {
        UsageError(path.display().to_string())
    }
}

/// A profile that cannot be read, parsed or validated (the CLI exits with status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProfileError(pub String);

/// Whether an error is a usage or profile problem (exit status 2). `chain()` alone does not do:
/// it yields a context as anyhow's wrapper type, which only `downcast_ref` sees through.
pub fn is_usage(e: &anyhow::Error) -> bool {
    e.downcast_ref::<UsageError>().is_some()
        || e.downcast_ref::<ProfileError>().is_some()
        || e.chain().any(|c| c.is::<UsageError>() || c.is::<ProfileError>())
}

/// Marks a failure as a usage problem (exit status 2) without flattening its causes.
pub trait ResultExt<T> {
    /// A problem with the profile's content: `PROFILE: cause: ...`.
    fn in_profile(self, path: &Path) -> anyhow::Result<T>;
    /// A usage problem that `what` describes: `what: cause: ...`.
    fn usage(self, what: impl Display) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> ResultExt<T> for Result<T, E> {
    fn in_profile(self, path: &Path) -> anyhow::Result<T> {
        self.map_err(|e| e.into().context(UsageError::in_profile(path)))
    }

    fn usage(self, what: impl Display) -> anyhow::Result<T> {
        self.map_err(|e| e.into().context(UsageError(what.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{anyhow, Context};

    #[test]
    fn context_markers_keep_the_chain_and_print_as_the_flattened_string_did() {
        let cause = || Err::<(), _>(anyhow!("inner cause")).context("key `users[0]`");
        let flat = cause().map_err(|e| anyhow::Error::new(UsageError(format!("p.yaml: {e:#}")))).unwrap_err();
        let marked = cause().in_profile(Path::new("p.yaml")).unwrap_err();
        assert_eq!(format!("{marked:#}"), format!("{flat:#}"));
        assert_eq!(format!("{marked:#}"), "p.yaml: key `users[0]`: inner cause");
        assert_eq!(marked.chain().count(), 3, "the causes stay separate");
        let wrapped = marked.context("building the x86_64 image");
        assert_eq!(format!("{wrapped:#}"), "building the x86_64 image: p.yaml: key `users[0]`: inner cause");
    }

    #[test]
    fn usage_is_found_as_error_cause_or_context() {
        // anyhow's chain yields a context as its wrapper type: `is` misses it, `downcast_ref` finds it.
        let as_context = Err::<(), _>(anyhow!("cause")).usage("--disk x").unwrap_err().context("outer");
        assert!(!as_context.chain().any(|c| c.is::<UsageError>()));
        assert!(as_context.downcast_ref::<UsageError>().is_some());
        assert!(is_usage(&as_context));
        assert_eq!(format!("{as_context:#}"), "outer: --disk x: cause");

        let as_error = anyhow::Error::new(UsageError("--boot 3".into())).context("outer");
        assert!(is_usage(&as_error));
        let profile = anyhow::Error::new(ProfileError("p.yaml: bad".into()));
        assert!(is_usage(&profile));
        // The source of another error: found in the chain.
        #[derive(Debug, thiserror::Error)]
        #[error("wrapper")]
        struct Wrapper(#[source] UsageError);
        assert!(is_usage(&anyhow::Error::new(Wrapper(UsageError("deep".into()))).context("x")));

        assert!(!is_usage(&anyhow!("plain").context("ctx")));
        let io = std::fs::read("/nonexistent/kiln").context("reading").unwrap_err();
        assert!(!is_usage(&io));
    }
}
