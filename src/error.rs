//! Error text helpers: every error reaches the user as one line.

/// candle errors can carry backtraces and nested context over several lines; keep the first.
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
