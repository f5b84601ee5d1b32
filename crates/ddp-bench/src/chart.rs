//! A small SVG line chart of latency percentiles (log scale), one line per system.

use std::fmt::Write;

/// One line: a name and its latency in ms at each percentile of [`PERCENTILES`].
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Milliseconds, one per percentile.
    pub ms: Vec<f64>,
}

/// The percentiles plotted (100 is the maximum).
pub const PERCENTILES: [f64; 6] = [50.0, 90.0, 99.0, 99.9, 99.99, 100.0];

const COLORS: [&str; 6] = ["#1b6ac9", "#2a9d4b", "#d1495b", "#8a5cc2", "#e08e0b", "#555555"];

/// Renders the chart.
pub fn latency_svg(title: &str, series: &[Series]) -> String {
    let (w, h) = (760.0, 420.0);
    let (left, right, top, bottom) = (70.0, 230.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let all: Vec<f64> = series.iter().flat_map(|s| s.ms.iter().copied()).filter(|v| *v > 0.0).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.01);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    let (lo_exp, hi_exp) = (lo.log10().floor(), hi.log10().ceil());
    let y = |v: f64| top + ph - (v.max(lo).log10() - lo_exp) / (hi_exp - lo_exp) * ph;
    let x = |i: usize| left + pw * i as f64 / (PERCENTILES.len() - 1) as f64;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = write!(svg, r#"<text x="{}" y="22" font-size="15" font-weight="bold">{}</text>"#, left, escape(title));
    // Grid: one line per power of ten.
    let mut e = lo_exp;
    while e <= hi_exp {
        let v = 10f64.powf(e);
        let yy = y(v);
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{} ms</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0,
            trim(v)
        );
        e += 1.0;
    }
    for (i, p) in PERCENTILES.iter().enumerate() {
        let label = if *p >= 100.0 { "max".to_owned() } else { format!("p{}", trim(*p)) };
        let _ = write!(
            svg,
            r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{1:.1}" stroke="#eee"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{label}</text>"##,
            x(i),
            top + ph,
            top + ph + 18.0
        );
    }
    let _ = write!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/><text x="{}" y="{}" text-anchor="middle">percentile</text>"##,
        left + pw / 2.0,
        h - 12.0
    );
    for (k, s) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<String> = s.ms.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v))).collect();
        let _ =
            write!(svg, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, points.join(" "));
        for (i, v) in s.ms.iter().enumerate() {
            let _ = write!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, x(i), y(*v));
        }
        let ly = top + 10.0 + k as f64 * 20.0;
        let lx = left + pw + 15.0;
        let _ = write!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_is_svg_with_a_line_per_system() {
        let svg = latency_svg(
            "t",
            &[
                Series { name: "a <1>".into(), ms: vec![0.5, 0.8, 1.2, 2.0, 3.0, 9.0] },
                Series { name: "b".into(), ms: vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6] },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt;1&gt;"));
        assert!(svg.contains(">max<") && svg.contains(">p99.9<"));
    }
}
