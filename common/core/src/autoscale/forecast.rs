//! The two inputs that look ahead: the slope of a metric over its window
//! ([`slope`], a least-squares line) and Holt's linear forecast with an upper
//! prediction bound ([`holt`]). Pure functions of the samples; no clock.

use super::Sample;

/// A least-squares line through samples: the value it gives at the last sample's
/// time and its slope per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line {
    /// The line's value at the newest sample's time.
    pub at_end: f64,
    /// Change per second.
    pub per_sec: f64,
}

impl Line {
    /// The line's value `secs` after the newest sample.
    pub fn project(&self, secs: f64) -> f64 {
        self.at_end + self.per_sec * secs
    }
}

/// The least-squares line through the finite samples, or `None` with fewer than
/// three samples or no spread in time.
pub fn slope(samples: &[Sample]) -> Option<Line> {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.value.is_finite())
        .map(|s| (s.at_ms as f64 / 1000.0, s.value))
        .collect();
    if pts.len() < 3 {
        return None;
    }
    let n = pts.len() as f64;
    // Centred on the first sample so that Unix seconds do not cost precision.
    let t0 = pts[0].0;
    let mt = pts.iter().map(|p| p.0 - t0).sum::<f64>() / n;
    let mv = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for &(t, v) in &pts {
        let dt = t - t0 - mt;
        sxy += dt * (v - mv);
        sxx += dt * dt;
    }
    if sxx <= 0.0 {
        return None;
    }
    let per_sec = sxy / sxx;
    let t_end = pts.iter().map(|p| p.0).fold(f64::MIN, f64::max) - t0;
    Some(Line {
        at_end: mv + per_sec * (t_end - mt),
        per_sec,
    })
}

/// Holt's linear forecast `horizon_steps` buckets ahead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// The point forecast.
    pub mean: f64,
    /// The upper bound of the one-sided prediction interval at the confidence
    /// asked for.
    pub upper: f64,
    /// The smoothing weights chosen (level, trend).
    pub alpha: f64,
    /// See `alpha`.
    pub beta: f64,
}

/// Fewest buckets a forecast fits.
pub const MIN_BUCKETS: usize = 6;

/// Averages samples in `(from_ms, to_ms]` into buckets of `bucket_ms`, oldest
/// first; an empty bucket repeats the previous value (a gap is not a zero).
pub fn buckets(samples: &[Sample], from_ms: u64, to_ms: u64, bucket_ms: u64) -> Vec<f64> {
    let bucket_ms = bucket_ms.max(1);
    let n = usize::try_from(to_ms.saturating_sub(from_ms).div_ceil(bucket_ms)).unwrap_or(0);
    let mut sum = vec![0.0; n];
    let mut count = vec![0u32; n];
    for s in samples {
        if s.at_ms <= from_ms || s.at_ms > to_ms || !s.value.is_finite() {
            continue;
        }
        let i = usize::try_from((s.at_ms - from_ms - 1) / bucket_ms).unwrap_or(usize::MAX);
        if i < n {
            sum[i] += s.value;
            count[i] += 1;
        }
    }
    let mut out = Vec::with_capacity(n);
    let mut last = None;
    for (s, c) in sum.into_iter().zip(count) {
        if c > 0 {
            let v = s / f64::from(c);
            out.push(v);
            last = Some(v);
        } else if let Some(v) = last {
            out.push(v);
        }
        // Leading empty buckets are dropped: nothing to repeat yet.
    }
    out
}

/// Holt's linear (double exponential) smoothing of `series`, forecast
/// `horizon_steps` ahead, with the smoothing weights chosen from a grid by the
/// least squared one-step error, and the upper bound of the one-sided
/// `confidence` interval (0.5–0.999) from the one-step errors' spread:
/// `σ² (1 + Σ_{j<h} α² (1 + jβ)²)` (Hyndman and Athanasopoulos, *Forecasting:
/// Principles and Practice*, 3rd ed., table 8.8). `None` with fewer than
/// [`MIN_BUCKETS`] values.
pub fn holt(series: &[f64], horizon_steps: u32, confidence: f64) -> Option<Forecast> {
    if series.len() < MIN_BUCKETS || series.iter().any(|v| !v.is_finite()) {
        return None;
    }
    const GRID: [f64; 6] = [0.1, 0.2, 0.35, 0.5, 0.7, 0.9];
    let mut best: Option<(f64, f64, f64, f64, f64)> = None; // sse, alpha, beta, level, trend
    for &alpha in &GRID {
        for &beta in &GRID {
            let (sse, level, trend) = run(series, alpha, beta);
            if best.is_none_or(|b| sse < b.0) {
                best = Some((sse, alpha, beta, level, trend));
            }
        }
    }
    let (sse, alpha, beta, level, trend) = best?;
    let h = horizon_steps.max(1);
    let mean = level + f64::from(h) * trend;
    let fit = Fit {
        sse,
        errors: series.len() - 2,
        alpha,
        beta,
        season: None,
    };
    Some(fit.forecast(mean, h as usize, confidence))
}

/// A fitted smoothing: what its prediction interval needs.
struct Fit {
    sse: f64,
    errors: usize,
    alpha: f64,
    beta: f64,
    /// (γ, period) of a seasonal fit.
    season: Option<(f64, usize)>,
}

impl Fit {
    /// The forecast `mean`, `h` steps ahead, with the upper bound of its one-sided
    /// `confidence` interval: `σ² (1 + Σ_{j<h} (α (1 + jβ) + γ [j mod m = 0])²)`.
    fn forecast(&self, mean: f64, h: usize, confidence: f64) -> Forecast {
        let sigma2 = self.sse / (self.errors as f64).max(1.0);
        let mut var = 1.0;
        for j in 1..h {
            let seasonal = match self.season {
                Some((gamma, m)) if j % m == 0 => gamma,
                _ => 0.0,
            };
            let c = self.alpha * (1.0 + j as f64 * self.beta) + seasonal;
            var += c * c;
        }
        let z = normal_quantile(confidence.clamp(0.5, 0.999));
        Forecast {
            mean,
            upper: mean + z * (sigma2 * var).sqrt(),
            alpha: self.alpha,
            beta: self.beta,
        }
    }
}

/// Holt–Winters additive smoothing of `series` with a season of `period` values
/// (a day in buckets), forecast `horizon_steps` ahead, with the weights chosen
/// from a grid by the least squared one-step error and the upper bound of the
/// one-sided `confidence` interval from `σ² (1 + Σ_{j<h} (α (1 + jβ) + γ [j mod
/// m = 0])²)` (Hyndman and Athanasopoulos, table 8.8). `None` with fewer than two
/// seasons of values or a period under 2.
pub fn holt_winters(
    series: &[f64],
    period: usize,
    horizon_steps: u32,
    confidence: f64,
) -> Option<Forecast> {
    if period < 2 || series.len() < 2 * period || series.iter().any(|v| !v.is_finite()) {
        return None;
    }
    const LEVEL: [f64; 4] = [0.1, 0.3, 0.5, 0.8];
    const TREND: [f64; 3] = [0.01, 0.1, 0.3];
    const SEASON: [f64; 3] = [0.05, 0.2, 0.5];
    let mut best: Option<(f64, f64, f64, f64, f64)> = None; // sse, alpha, beta, gamma, forecast
    let h = horizon_steps.max(1) as usize;
    for &alpha in &LEVEL {
        for &beta in &TREND {
            for &gamma in &SEASON {
                let (sse, mean) = run_seasonal(series, period, alpha, beta, gamma, h);
                if best.is_none_or(|b| sse < b.0) {
                    best = Some((sse, alpha, beta, gamma, mean));
                }
            }
        }
    }
    let (sse, alpha, beta, gamma, mean) = best?;
    let fit = Fit {
        sse,
        errors: series.len() - period,
        alpha,
        beta,
        season: Some((gamma, period)),
    };
    Some(fit.forecast(mean, h, confidence))
}

/// One pass of additive Holt–Winters: the sum of squared one-step errors after
/// the first season, and the forecast `h` steps past the end.
fn run_seasonal(
    series: &[f64],
    m: usize,
    alpha: f64,
    beta: f64,
    gamma: f64,
    h: usize,
) -> (f64, f64) {
    let first = series[..m].iter().sum::<f64>() / m as f64;
    let second = series[m..2 * m].iter().sum::<f64>() / m as f64;
    let mut level = first;
    let mut trend = (second - first) / m as f64;
    let mut season: Vec<f64> = series[..m].iter().map(|y| y - first).collect();
    let mut sse = 0.0;
    for (t, &y) in series.iter().enumerate().skip(m) {
        let s = season[t % m];
        let e = y - (level + trend + s);
        sse += e * e;
        let new_level = alpha * (y - s) + (1.0 - alpha) * (level + trend);
        trend = beta * (new_level - level) + (1.0 - beta) * trend;
        season[t % m] = gamma * (y - new_level) + (1.0 - gamma) * s;
        level = new_level;
    }
    let mean = level + h as f64 * trend + season[(series.len() + h - 1) % m];
    (sse, mean)
}

/// One pass of Holt's method: the sum of squared one-step errors, and the final
/// level and trend.
fn run(series: &[f64], alpha: f64, beta: f64) -> (f64, f64, f64) {
    let mut level = series[0];
    let mut trend = series[1] - series[0];
    let mut sse = 0.0;
    // The first one-step error (at index 1) is zero by construction; it is not
    // counted as a degree of freedom.
    for &y in &series[1..] {
        let predicted = level + trend;
        let e = y - predicted;
        sse += e * e;
        let new_level = alpha * y + (1.0 - alpha) * predicted;
        trend = beta * (new_level - level) + (1.0 - beta) * trend;
        level = new_level;
    }
    (sse, level, trend)
}

/// The standard normal quantile, by Acklam's rational approximation (relative
/// error below 1.2e-9), for `p` in (0, 1).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(values: &[(u64, f64)]) -> Vec<Sample> {
        values
            .iter()
            .map(|&(s, value)| Sample {
                at_ms: s * 1000,
                value,
            })
            .collect()
    }

    #[test]
    fn the_slope_of_a_straight_line_is_exact_and_projects_ahead() {
        let s = series(&[(100, 10.0), (110, 20.0), (120, 30.0), (130, 40.0)]);
        let l = slope(&s).expect("a line");
        assert!((l.per_sec - 1.0).abs() < 1e-9, "{l:?}");
        assert!((l.at_end - 40.0).abs() < 1e-9, "{l:?}");
        assert!((l.project(60.0) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn too_few_samples_or_no_spread_in_time_give_no_slope() {
        assert_eq!(slope(&series(&[(1, 1.0), (2, 5.0)])), None);
        assert_eq!(slope(&series(&[(5, 1.0), (5, 2.0), (5, 3.0)])), None);
        let with_nan = series(&[(1, 1.0), (2, f64::NAN), (3, 3.0)]);
        assert_eq!(slope(&with_nan), None, "NaN is not a sample");
    }

    #[test]
    fn buckets_average_and_carry_gaps_forward() {
        let s = series(&[(1, 2.0), (2, 4.0), (7, 10.0), (21, 1.0)]);
        // Buckets of 5 s over (0, 25]: [1,5] [6,10] (11,15] empty (16,20] empty (21,25].
        let b = buckets(&s, 0, 25_000, 5_000);
        assert_eq!(b, vec![3.0, 10.0, 10.0, 10.0, 1.0]);
    }

    #[test]
    fn holt_follows_a_linear_rise_and_its_bound_sits_above_the_mean() {
        let line: Vec<f64> = (0..30).map(|i| 100.0 + 5.0 * f64::from(i)).collect();
        let f = holt(&line, 4, 0.9).expect("forecast");
        // Next values: 250, 255, 260, 265.
        assert!((f.mean - 265.0).abs() < 1e-6, "{f:?}");
        assert!(f.upper >= f.mean);
        let noisy: Vec<f64> = (0..30)
            .map(|i| 100.0 + 5.0 * f64::from(i) + if i % 2 == 0 { 8.0 } else { -8.0 })
            .collect();
        let g = holt(&noisy, 4, 0.9).expect("forecast");
        assert!(g.upper > g.mean + 5.0, "noise widens the bound: {g:?}");
        let h = holt(&noisy, 4, 0.99).expect("forecast");
        assert!(h.upper > g.upper, "more confidence, higher bound");
        assert_eq!(holt(&line[..5], 1, 0.9), None, "too short");
    }

    #[test]
    fn holt_winters_forecasts_the_next_day_s_rise_from_the_last_days() {
        // Three days of a daily shape in 24 hourly buckets: 100 at night, 400
        // from 09:00 to 20:00, with a little noise.
        let day = |h: usize| if (9..20).contains(&h) { 400.0 } else { 100.0 };
        let series: Vec<f64> = (0..72)
            .map(|i| day(i % 24) + if i % 3 == 0 { 5.0 } else { -2.5 })
            .collect();
        // The series ends at 23:00 of day 3: the next 09:00 is 10 steps ahead.
        let nine = holt_winters(&series, 24, 10, 0.8).expect("forecast");
        assert!((nine.mean - 400.0).abs() < 40.0, "{nine:?}");
        assert!(nine.upper >= nine.mean);
        // Holt's linear method sees only a level near the night's.
        let flat = holt(&series, 10, 0.8).expect("forecast");
        assert!(flat.mean < 250.0, "{flat:?}");
        assert_eq!(
            holt_winters(&series[..40], 24, 1, 0.8),
            None,
            "two seasons needed"
        );
    }

    #[test]
    fn the_normal_quantile_matches_the_tables() {
        for (p, z) in [
            (0.5, 0.0),
            (0.8, 0.841_621),
            (0.9, 1.281_552),
            (0.99, 2.326_348),
        ] {
            assert!((normal_quantile(p) - z).abs() < 1e-5, "{p}");
        }
        assert!((normal_quantile(0.01) + 2.326_348).abs() < 1e-5);
    }
}
