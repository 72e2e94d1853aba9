//! The comparison table of issue 13: per measure the ceiling, each peer, ours, and the ratios of
//! ours to the ceiling and to the best peer, oriented so that above 1 is better for us whether
//! the unit is a rate (higher is better) or a time (lower is better).
//!
//! A cell is a value or the reason it is missing; a missing ceiling or peer only blanks the
//! ratios that need it.

use crate::mounts::System;

/// Which direction is better for a measure.
#[derive(Clone, Copy)]
pub enum Better {
    Higher,
    Lower,
    /// Shown without ratios (resident memory: a budget, not a race).
    NoRatio,
}

pub type Cell = Result<f64, String>;

pub struct Measure {
    /// Position in the printed table (the order), whatever order sections ran in.
    pub rank: u8,
    pub what: String,
    pub better: Better,
    /// Decimals to print values with.
    pub decimals: usize,
    /// `None` for a measure without one.
    pub ceiling: Option<Cell>,
    /// What the ceiling is, e.g. "16 × 8 MiB ranged GETs".
    pub ceiling_is: String,
    /// Per system, in [`System::ALL`] order.
    pub systems: Vec<(System, Cell)>,
}

impl Measure {
    fn get(&self, s: System) -> Option<&Cell> {
        self.systems.iter().find(|(x, _)| *x == s).map(|(_, c)| c)
    }

    fn fmt(&self, c: &Cell) -> String {
        match c {
            Ok(v) => format!("{v:.*}", self.decimals),
            Err(why) => format!("n/a ({why})"),
        }
    }

    /// How many times better `ours` is than `other`.
    fn ratio(&self, ours: f64, other: f64) -> Option<f64> {
        match self.better {
            Better::Higher => Some(ours / other),
            Better::Lower => Some(other / ours),
            Better::NoRatio => None,
        }
    }

    fn best_peer(&self) -> Option<f64> {
        let peers = self
            .systems
            .iter()
            .filter(|(s, _)| *s != System::Datastore)
            .filter_map(|(_, c)| c.as_ref().ok().copied());
        match self.better {
            Better::Higher => peers.reduce(f64::max),
            Better::Lower => peers.reduce(f64::min),
            Better::NoRatio => None,
        }
    }

    fn cells(&self) -> Vec<String> {
        let ours = self
            .get(System::Datastore)
            .and_then(|c| c.as_ref().ok())
            .copied();
        let show = |r: Option<f64>| r.map_or("–".to_string(), |r| format!("{r:.2}"));
        let mut cells = vec![
            self.what.clone(),
            match &self.ceiling {
                None => "–".into(),
                Some(c @ Ok(_)) if !self.ceiling_is.is_empty() => {
                    format!("{} ({})", self.fmt(c), self.ceiling_is)
                }
                Some(c) => self.fmt(c),
            },
        ];
        for s in System::ALL {
            cells.push(self.get(s).map_or("–".into(), |c| self.fmt(c)));
        }
        let ceiling = self.ceiling.as_ref().and_then(|c| c.as_ref().ok()).copied();
        let vs_ceiling = ours.zip(ceiling);
        cells.push(show(vs_ceiling.and_then(|(o, c)| self.ratio(o, c))));
        cells.push(show(
            ours.zip(self.best_peer())
                .and_then(|(o, p)| self.ratio(o, p)),
        ));
        cells
    }
}

/// Prints `measures` (sorted by rank) as an aligned markdown table.
pub fn print(mut measures: Vec<Measure>) {
    measures.sort_by_key(|m| m.rank);
    let mut header: Vec<String> = vec!["measure".into(), "ceiling".into()];
    for s in System::ALL {
        header.push(match s {
            System::Datastore => "datastore".into(),
            peer => format!("{} (tuned)", peer.label()),
        });
    }
    header.push("ours ÷ ceiling".into());
    header.push("ours ÷ best peer".into());
    let rows: Vec<Vec<String>> = measures.iter().map(Measure::cells).collect();
    let width = |i: usize| {
        rows.iter()
            .chain(std::iter::once(&header))
            .map(|r| r[i].chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |r: &[String]| {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        println!("| {} |", cells.join(" | "));
    };
    line(&header);
    println!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in &rows {
        line(r);
    }
}
