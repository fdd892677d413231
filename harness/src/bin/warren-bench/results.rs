//! Every figure of a run: rows (scenario, client, metric), each with the values of every
//! target over the repeats and the CPU used while they were measured.

use crate::sys::CpuUse;
use crate::target::Kind;
use std::collections::BTreeMap;

/// Which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Better {
    /// More is better (rates).
    Higher,
    /// Less is better (latency, memory, CPU).
    Lower,
}

/// What a figure measures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Metric {
    /// Its name in the table.
    pub(crate) name: &'static str,
    /// Its unit.
    pub(crate) unit: &'static str,
    /// Which way is better.
    pub(crate) better: Better,
}

impl Metric {
    /// A rate or other more-is-better figure.
    pub(crate) const fn higher(name: &'static str, unit: &'static str) -> Self {
        Self {
            name,
            unit,
            better: Better::Higher,
        }
    }

    /// A latency, size or cost.
    pub(crate) const fn lower(name: &'static str, unit: &'static str) -> Self {
        Self {
            name,
            unit,
            better: Better::Lower,
        }
    }
}

/// One target's values of one row.
#[derive(Debug, Clone, Default)]
pub(crate) struct Series {
    /// One value per repeat.
    pub(crate) values: Vec<f64>,
    /// Cores the bench process used during each repeat (client; in embedded mode, client
    /// and broker).
    pub(crate) client_cores: Vec<f64>,
    /// Share of one core used by the bench's busiest thread during each repeat.
    pub(crate) busiest_thread: Vec<f64>,
    /// Cores the broker process used during each repeat (standalone and local RabbitMQ).
    pub(crate) broker_cores: Vec<f64>,
    /// A fixed reference, not measured in this run (RabbitMQ's cold start).
    pub(crate) reference: bool,
}

/// The median, minimum and maximum of some values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Summary {
    /// Median.
    pub(crate) median: f64,
    /// Minimum.
    pub(crate) min: f64,
    /// Maximum.
    pub(crate) max: f64,
}

/// Summarises values (none: `None`).
pub(crate) fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Summary {
        median: percentile_sorted(&sorted, 0.5),
        min: sorted[0],
        max: sorted[sorted.len() - 1],
    })
}

/// The `p` quantile (0..=1) of sorted values, by linear interpolation.
pub(crate) fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = p * (sorted.len() - 1) as f64;
    let low = rank.floor() as usize;
    let high = rank.ceil() as usize;
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

impl Series {
    /// Median, min and max of the values.
    pub(crate) fn summary(&self) -> Option<Summary> {
        summarize(&self.values)
    }

    /// This series over `base`: the median of the ratios of the values measured in the same
    /// round (the runner measures every target of a scenario, and every row of a group, back to
    /// back in each round, so a slow phase of the machine falls on both), or the ratio of the
    /// medians when the values do not pair up (a reference value, a target skipped midway).
    pub(crate) fn ratio_to(&self, base: &Series) -> Option<f64> {
        let paired = !self.reference
            && !base.reference
            && !self.values.is_empty()
            && self.values.len() == base.values.len()
            && base.values.iter().all(|&b| b != 0.0);
        if paired {
            let ratios: Vec<f64> = self
                .values
                .iter()
                .zip(&base.values)
                .map(|(a, b)| a / b)
                .collect();
            return summarize(&ratios).map(|s| s.median);
        }
        match (self.summary(), base.summary()) {
            (Some(a), Some(b)) if b.median != 0.0 => Some(a.median / b.median),
            _ => None,
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// The scenario, e.g. `pubsub 16 B`.
    pub(crate) scenario: String,
    /// The client that produced the load.
    pub(crate) client: &'static str,
    /// What is measured.
    pub(crate) metric: Metric,
    /// Values by target.
    pub(crate) by_target: BTreeMap<Kind, Series>,
}

/// All rows, in the order they were first recorded.
#[derive(Debug, Default)]
pub(crate) struct Results {
    /// The rows.
    pub(crate) rows: Vec<Row>,
    /// Figures that belong to the machine rather than a broker (the ping-pong floors):
    /// name, unit, summary.
    pub(crate) floors: Vec<(String, &'static str, Summary)>,
    /// Cores used by other processes (neither the bench, nor the broker measured) during
    /// each measured window: the noise.
    pub(crate) noise: Vec<f64>,
}

impl Results {
    fn row_mut(&mut self, scenario: &str, client: &'static str, metric: Metric) -> &mut Row {
        let at = self.rows.iter().position(|r| {
            r.scenario == scenario && r.client == client && r.metric.name == metric.name
        });
        let at = match at {
            Some(at) => at,
            None => {
                // A new row goes after the last one of its scenario (derived rows join their
                // scenario's group), or at the end.
                let at = self
                    .rows
                    .iter()
                    .rposition(|r| r.scenario == scenario)
                    .map_or(self.rows.len(), |i| i + 1);
                self.rows.insert(
                    at,
                    Row {
                        scenario: scenario.to_owned(),
                        client,
                        metric,
                        by_target: BTreeMap::new(),
                    },
                );
                at
            }
        };
        &mut self.rows[at]
    }

    /// Records one value, with the CPU used while it was measured if known.
    pub(crate) fn record(
        &mut self,
        scenario: &str,
        client: &'static str,
        metric: Metric,
        target: Kind,
        value: f64,
        cpu: Option<&CpuUse>,
    ) {
        let series = self
            .row_mut(scenario, client, metric)
            .by_target
            .entry(target)
            .or_default();
        series.values.push(value);
        if let Some(cpu) = cpu
            && cpu.wall > 0.0
        {
            series.client_cores.push(cpu.own / cpu.wall);
            series.busiest_thread.push(cpu.busiest_thread / cpu.wall);
            if let Some(broker) = cpu.broker {
                series.broker_cores.push(broker / cpu.wall);
            }
        }
    }

    /// Records a fixed reference value (not measured in this run).
    pub(crate) fn reference(
        &mut self,
        scenario: &str,
        client: &'static str,
        metric: Metric,
        target: Kind,
        value: f64,
    ) {
        let series = self
            .row_mut(scenario, client, metric)
            .by_target
            .entry(target)
            .or_default();
        series.values = vec![value];
        series.reference = true;
    }

    /// The values of a row for a target.
    pub(crate) fn series(
        &self,
        scenario: &str,
        client: &str,
        metric: &str,
        target: Kind,
    ) -> Option<&Series> {
        self.rows
            .iter()
            .find(|r| r.scenario == scenario && r.client == client && r.metric.name == metric)?
            .by_target
            .get(&target)
    }

    /// The median of a row for a target.
    pub(crate) fn median(
        &self,
        scenario: &str,
        client: &str,
        metric: &str,
        target: Kind,
    ) -> Option<f64> {
        self.series(scenario, client, metric, target)?
            .summary()
            .map(|s| s.median)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(summarize(&[1.0, 2.0, 3.0, 4.0]).unwrap().median, 2.5);
        assert!(summarize(&[]).is_none());
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile_sorted(&sorted, 0.99) - 99.01).abs() < 1e-9);
    }

    fn series(values: &[f64]) -> Series {
        Series {
            values: values.to_vec(),
            ..Series::default()
        }
    }

    #[test]
    fn ratios_pair_the_values_of_each_round() {
        // Round 2 is a slow phase for both: the per-round ratios are all 2.
        let fast = series(&[20.0, 8.0, 22.0]);
        let slow = series(&[10.0, 4.0, 11.0]);
        assert_eq!(fast.ratio_to(&slow), Some(2.0));
        // One row in a slow phase the other missed: the medians would say 8 / 10.
        let shifted = series(&[20.0, 8.0, 8.0]);
        assert_eq!(shifted.ratio_to(&slow), Some(2.0));
        // Unpaired (a target skipped midway, or a reference): the ratio of the medians.
        assert_eq!(series(&[30.0, 10.0]).ratio_to(&slow), Some(2.0));
        let reference = Series {
            reference: true,
            ..series(&[5.0])
        };
        assert_eq!(series(&[1.0, 2.0, 3.0]).ratio_to(&reference), Some(0.4));
    }
}
