//! Function versions and version constraints (`>=1.1,<2`, `==1.0.0`, bare `1.5`).
//!
//! A version is `MAJOR[.MINOR[.PATCH]]` with missing parts read as 0. A constraint is a
//! comma-separated list of clauses, each an operator (`>=`, `>`, `<=`, `<`, `==`, `!=`)
//! followed by a version, or a bare version meaning `==`. Anything else (`~1.2`, `^1`,
//! `1.x`) is rejected as a request error rather than guessed at.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A three-part version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Incompatible changes.
    pub major: u64,
    /// Compatible additions.
    pub minor: u64,
    /// Fixes.
    pub patch: u64,
}

impl Version {
    /// `major.minor.patch`.
    pub const fn new(major: u64, minor: u64, patch: u64) -> Self {
        Version { major, minor, patch }
    }
}

impl Default for Version {
    fn default() -> Self {
        Version::new(1, 0, 0)
    }
}

/// Why a version or constraint did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version constraint: {0}")]
pub struct VersionError(pub String);

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError(text.to_owned());
        let mut parts = text.trim().split('.');
        let mut next = |required: bool| -> Result<u64, VersionError> {
            match parts.next() {
                Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().map_err(|_| bad()),
                None if !required => Ok(0),
                _ => Err(bad()),
            }
        };
        let version = Version::new(next(true)?, next(false)?, next(false)?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(version)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
    Ne,
}

/// A parsed constraint: every clause must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionConstraint {
    clauses: Vec<(Op, Version)>,
}

impl VersionConstraint {
    /// Whether `version` satisfies every clause.
    pub fn matches(&self, version: &Version) -> bool {
        self.clauses.iter().all(|(op, bound)| match op {
            Op::Ge => version >= bound,
            Op::Gt => version > bound,
            Op::Le => version <= bound,
            Op::Lt => version < bound,
            Op::Eq => version == bound,
            Op::Ne => version != bound,
        })
    }
}

impl FromStr for VersionConstraint {
    type Err = VersionError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError(text.to_owned());
        let mut clauses = Vec::new();
        for clause in text.split(',') {
            let clause = clause.trim();
            let (op, rest) =
                [(">=", Op::Ge), ("<=", Op::Le), ("==", Op::Eq), ("!=", Op::Ne), (">", Op::Gt), ("<", Op::Lt)]
                    .into_iter()
                    .find_map(|(prefix, op)| clause.strip_prefix(prefix).map(|rest| (op, rest)))
                    .unwrap_or((Op::Eq, clause));
            clauses.push((op, rest.trim().parse::<Version>().map_err(|_| bad())?));
        }
        Ok(VersionConstraint { clauses })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(text: &str) -> Version {
        text.parse().unwrap()
    }

    #[test]
    fn partial_versions_fill_with_zero() {
        assert_eq!(v("1.5"), Version::new(1, 5, 0));
        assert_eq!(v("2"), Version::new(2, 0, 0));
    }

    #[test]
    fn constraints_from_the_conformance_cases() {
        let range: VersionConstraint = ">=1.0.0,<2.0.0".parse().unwrap();
        assert!(range.matches(&v("1.5.0")) && !range.matches(&v("2.0.0")));
        let bare: VersionConstraint = "1.5".parse().unwrap();
        assert!(bare.matches(&v("1.5.0")) && !bare.matches(&v("1.5.1")));
        for bad in ["~1.2", "^1", "1.x", "", ">=", "1.2.3.4", ">=1,,<2"] {
            assert!(bad.parse::<VersionConstraint>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(a in 0u64..1000, b in 0u64..1000, c in 0u64..1000) {
            let version = Version::new(a, b, c);
            prop_assert_eq!(version.to_string().parse::<Version>().unwrap(), version);
        }

        /// `>=x,<y` holds exactly for the versions between x and y.
        #[test]
        fn range_matches_interval(lo in (0u64..5, 0u64..5, 0u64..5), hi in (0u64..5, 0u64..5, 0u64..5), probe in (0u64..5, 0u64..5, 0u64..5)) {
            let (lo, hi, probe) = (Version::new(lo.0, lo.1, lo.2), Version::new(hi.0, hi.1, hi.2), Version::new(probe.0, probe.1, probe.2));
            let c: VersionConstraint = format!(">={lo},<{hi}").parse().unwrap();
            prop_assert_eq!(c.matches(&probe), lo <= probe && probe < hi);
        }

        #[test]
        fn parsing_never_panics(text in ".{0,20}") {
            let _ = text.parse::<VersionConstraint>();
        }
    }
}
