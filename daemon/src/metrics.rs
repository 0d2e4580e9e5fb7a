//! Prometheus metrics: a process-wide registry of counters, gauges and histograms, rendered in
//! the text exposition format (with HELP and TYPE) for the status server's `/metrics`.
//!
//! Series are registered once (by the capture loops, upload threads and stream sessions, which
//! keep the returned handle) and updated with atomics; gauges that depend on the time of the
//! scrape (lag in seconds) are closures evaluated when `/metrics` is read.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Buckets (seconds) of the duration histograms: 1 ms … 60 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (stored as f64 bits).
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Observations counted into cumulative buckets.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in nanoseconds (durations) — rendered in seconds.
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| s <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

enum Series {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    ValueFn(Box<dyn Fn() -> Option<f64> + Send + Sync>),
    Histogram(Arc<Histogram>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Type {
    Counter,
    Gauge,
    Histogram,
}

impl Type {
    fn as_str(self) -> &'static str {
        match self {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Histogram => "histogram",
        }
    }
}

struct Family {
    name: &'static str,
    help: &'static str,
    ty: Type,
    series: Vec<(String, Series)>,
}

static FAMILIES: Mutex<Vec<Family>> = Mutex::new(Vec::new());

/// `{a="x",b="y"}` with values escaped as the exposition format wants.
fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{v}\"");
    }
    s.push('}');
    s
}

impl Series {
    /// Another handle on the same series (None for a closure, which has one owner).
    fn share(&self) -> Option<Series> {
        match self {
            Series::Counter(c) => Some(Series::Counter(c.clone())),
            Series::Gauge(g) => Some(Series::Gauge(g.clone())),
            Series::Histogram(h) => Some(Series::Histogram(h.clone())),
            Series::ValueFn(_) => None,
        }
    }
}

/// Registers `name{labels}` (made by `make` unless a shareable one exists; a closure replaces
/// the one registered before, as for a restarted loop) and returns a handle on it.
fn register(
    name: &'static str,
    help: &'static str,
    ty: Type,
    labels: &[(&str, &str)],
    make: impl FnOnce() -> Series,
) -> Option<Series> {
    let key = render_labels(labels);
    let mut fams = FAMILIES.lock().unwrap_or_else(|e| e.into_inner());
    let fam = match fams.iter_mut().position(|f| f.name == name) {
        Some(i) => &mut fams[i],
        None => {
            fams.push(Family {
                name,
                help,
                ty,
                series: Vec::new(),
            });
            fams.last_mut().expect("pushed")
        }
    };
    debug_assert!(fam.ty == ty, "metric {name} registered with two types");
    if let Some(shared) = fam
        .series
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, s)| s.share())
    {
        return Some(shared);
    }
    fam.series.retain(|(k, _)| *k != key);
    let s = make();
    let out = s.share();
    fam.series.push((key, s));
    out
}

/// The counter `name{labels}` (the same one for the same name and labels).
pub fn counter(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Arc<Counter> {
    match register(name, help, Type::Counter, labels, || {
        Series::Counter(Arc::default())
    }) {
        Some(Series::Counter(c)) => c,
        _ => unreachable!("a counter"),
    }
}

/// The gauge `name{labels}`.
pub fn gauge(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Arc<Gauge> {
    match register(name, help, Type::Gauge, labels, || {
        Series::Gauge(Arc::default())
    }) {
        Some(Series::Gauge(g)) => g,
        _ => unreachable!("a gauge"),
    }
}

/// A gauge computed when `/metrics` is read (None: the series is left out this time).
pub fn gauge_fn(
    name: &'static str,
    help: &'static str,
    labels: &[(&str, &str)],
    f: impl Fn() -> Option<f64> + Send + Sync + 'static,
) {
    register(name, help, Type::Gauge, labels, || {
        Series::ValueFn(Box::new(f))
    });
}

/// A counter kept elsewhere, read when `/metrics` is read.
pub fn counter_fn(
    name: &'static str,
    help: &'static str,
    labels: &[(&str, &str)],
    f: impl Fn() -> Option<f64> + Send + Sync + 'static,
) {
    register(name, help, Type::Counter, labels, || {
        Series::ValueFn(Box::new(f))
    });
}

/// The duration histogram `name{labels}` (seconds, [`DURATION_BUCKETS`]).
pub fn histogram(
    name: &'static str,
    help: &'static str,
    labels: &[(&str, &str)],
) -> Arc<Histogram> {
    match register(name, help, Type::Histogram, labels, || {
        Series::Histogram(Arc::new(Histogram::new(DURATION_BUCKETS)))
    }) {
        Some(Series::Histogram(h)) => h,
        _ => unreachable!("a histogram"),
    }
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The text exposition format of every registered metric.
pub fn render() -> String {
    let fams = FAMILIES.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = String::with_capacity(8192);
    for f in fams.iter() {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.ty.as_str());
        for (labels, s) in &f.series {
            match s {
                Series::Counter(c) => {
                    let _ = writeln!(out, "{}{labels} {}", f.name, c.get());
                }
                Series::Gauge(g) => {
                    let _ = writeln!(out, "{}{labels} {}", f.name, num(g.get()));
                }
                Series::ValueFn(g) => {
                    if let Some(v) = g() {
                        let _ = writeln!(out, "{}{labels} {}", f.name, num(v));
                    }
                }
                Series::Histogram(h) => {
                    let inner = labels.trim_start_matches('{').trim_end_matches('}');
                    let sep = if inner.is_empty() { "" } else { "," };
                    let mut cum = 0u64;
                    for (b, c) in h.bounds.iter().zip(&h.counts) {
                        cum += c.load(Ordering::Relaxed);
                        let _ = writeln!(
                            out,
                            "{}_bucket{{{inner}{sep}le=\"{}\"}} {cum}",
                            f.name,
                            num(*b)
                        );
                    }
                    let count = h.count.load(Ordering::Relaxed);
                    let _ = writeln!(out, "{}_bucket{{{inner}{sep}le=\"+Inf\"}} {count}", f.name);
                    let _ = writeln!(
                        out,
                        "{}_sum{labels} {}",
                        f.name,
                        h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
                    );
                    let _ = writeln!(out, "{}_count{labels} {count}", f.name);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_exposition_format() {
        let c = counter("t_things_total", "Things.", &[("db", "a\"b")]);
        c.add(3);
        let h = histogram("t_took_seconds", "Took.", &[("db", "x")]);
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        gauge_fn("t_lag_seconds", "Lag.", &[], || Some(1.5));
        let out = render();
        assert!(out.contains("# TYPE t_things_total counter\nt_things_total{db=\"a\\\"b\"} 3\n"));
        assert!(out.contains("t_took_seconds_bucket{db=\"x\",le=\"0.005\"} 1\n"));
        assert!(out.contains("t_took_seconds_bucket{db=\"x\",le=\"60\"} 1\n"));
        assert!(out.contains("t_took_seconds_bucket{db=\"x\",le=\"+Inf\"} 2\n"));
        assert!(out.contains("t_took_seconds_count{db=\"x\"} 2\n"));
        assert!(out.contains("t_lag_seconds 1.5\n"));
        // The same name and labels give the same series.
        counter("t_things_total", "Things.", &[("db", "a\"b")]).inc();
        assert_eq!(c.get(), 4);
    }
}
