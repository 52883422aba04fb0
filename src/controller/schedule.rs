//! When a policy runs next, and which of its snapshots it keeps. Pure.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;

use super::crd::Retention;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("schedule '{schedule}' is not a cron expression: {why}")]
    Cron { schedule: String, why: String },
    #[error(
        "time zone '{0}' is unknown; use an IANA name such as Europe/Berlin or America/New_York"
    )]
    TimeZone(String),
    #[error("schedule '{0}' never fires")]
    Never(String),
}

/// A parsed schedule in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    zone: Tz,
    text: String,
}

impl Schedule {
    pub fn parse(schedule: &str, time_zone: Option<&str>) -> Result<Self, ScheduleError> {
        let cron: Cron =
            schedule
                .parse()
                .map_err(|e: croner::errors::CronError| ScheduleError::Cron {
                    schedule: schedule.to_string(),
                    why: e.to_string(),
                })?;
        let zone = match time_zone {
            None | Some("") => Tz::UTC,
            Some(name) => name
                .parse::<Tz>()
                .map_err(|_| ScheduleError::TimeZone(name.to_string()))?,
        };
        Ok(Schedule {
            cron,
            zone,
            text: schedule.to_string(),
        })
    }

    /// The first time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Result<DateTime<Utc>, ScheduleError> {
        let local = after.with_timezone(&self.zone);
        self.cron
            .find_next_occurrence(&local, false)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| ScheduleError::Never(self.text.clone()))
    }

    /// Whether a run is due at `now`: the first fire time after the last
    /// run (or after the policy was created) has passed. Missed fire times
    /// while the controller was down collapse into one run.
    pub fn due(
        &self,
        last_run: Option<DateTime<Utc>>,
        created: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(bool, DateTime<Utc>), ScheduleError> {
        let from = last_run.unwrap_or(created);
        let next = self.next_after(from)?;
        if next <= now {
            Ok((true, self.next_after(now)?))
        } else {
            Ok((false, next))
        }
    }
}

/// Which of `snapshots` (any order; (key, creation time)) `retention`
/// keeps. Nothing set keeps everything.
pub fn kept<K: Ord + Clone>(
    snapshots: &[(K, DateTime<Utc>)],
    retention: &Retention,
) -> BTreeSet<K> {
    let mut newest_first: Vec<&(K, DateTime<Utc>)> = snapshots.iter().collect();
    newest_first.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let all_unset = retention.keep_last.is_none()
        && retention.hourly.is_none()
        && retention.daily.is_none()
        && retention.weekly.is_none()
        && retention.monthly.is_none();
    if all_unset {
        return newest_first.iter().map(|(k, _)| k.clone()).collect();
    }
    let mut keep = BTreeSet::new();
    if let Some(n) = retention.keep_last {
        keep.extend(
            newest_first
                .iter()
                .take(n.max(0) as usize)
                .map(|(k, _)| k.clone()),
        );
    }
    type Bucket = fn(&DateTime<Utc>) -> (i32, u32, u32, u32);
    let buckets: [(Option<i32>, Bucket); 4] = [
        (retention.hourly, |t| (t.year(), t.ordinal(), t.hour(), 0)),
        (retention.daily, |t| (t.year(), t.ordinal(), 0, 0)),
        (retention.weekly, |t| {
            let week = t.iso_week();
            (week.year(), week.week(), 0, 0)
        }),
        (retention.monthly, |t| (t.year(), t.month(), 0, 0)),
    ];
    for (count, bucket) in buckets {
        let Some(count) = count else { continue };
        let mut seen = BTreeSet::new();
        for (key, created) in &newest_first {
            if seen.len() >= count.max(0) as usize {
                break;
            }
            // The newest snapshot of each period stands for it.
            if seen.insert(bucket(created)) {
                keep.insert(key.clone());
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn schedules_fire_in_their_time_zone() {
        let daily = Schedule::parse("0 2 * * *", Some("Europe/Berlin")).unwrap();
        // 02:00 in Berlin in winter is 01:00 UTC.
        assert_eq!(
            daily.next_after(at("2026-12-02T00:00:00Z")).unwrap(),
            at("2026-12-02T01:00:00Z")
        );
        let seconds = Schedule::parse("*/20 * * * * *", None).unwrap();
        assert_eq!(
            seconds.next_after(at("2026-12-02T00:00:05Z")).unwrap(),
            at("2026-12-02T00:00:20Z")
        );
        assert!(matches!(
            Schedule::parse("0 2 * *", None),
            Err(ScheduleError::Cron { .. })
        ));
        assert_eq!(
            Schedule::parse("@daily", Some("Mars/Olympus")).unwrap_err(),
            ScheduleError::TimeZone("Mars/Olympus".into())
        );
    }

    #[test]
    fn a_run_is_due_once_after_missed_fire_times() {
        let hourly = Schedule::parse("0 * * * *", None).unwrap();
        let created = at("2026-12-02T09:30:00Z");
        let (due, next) = hourly
            .due(None, created, at("2026-12-02T09:59:00Z"))
            .unwrap();
        assert!(!due);
        assert_eq!(next, at("2026-12-02T10:00:00Z"));
        // Down from 09:59 to 13:10: one run now, the next at 14:00.
        let (due, next) = hourly
            .due(None, created, at("2026-12-02T13:10:00Z"))
            .unwrap();
        assert!(due);
        assert_eq!(next, at("2026-12-02T14:00:00Z"));
        let (due, _) = hourly
            .due(
                Some(at("2026-12-02T13:10:00Z")),
                created,
                at("2026-12-02T13:50:00Z"),
            )
            .unwrap();
        assert!(!due);
    }

    #[test]
    fn retention_keeps_the_union_of_last_and_the_newest_of_each_period() {
        let snapshots: Vec<(String, DateTime<Utc>)> = [
            ("a", "2026-11-01T10:00:00Z"),
            ("b", "2026-11-30T23:00:00Z"),
            ("c", "2026-12-01T08:00:00Z"),
            ("d", "2026-12-01T08:30:00Z"),
            ("e", "2026-12-02T01:00:00Z"),
            ("f", "2026-12-02T01:10:00Z"),
        ]
        .iter()
        .map(|(k, t)| (k.to_string(), at(t)))
        .collect();
        let keep = |r: Retention| -> Vec<String> { kept(&snapshots, &r).into_iter().collect() };
        assert_eq!(keep(Retention::default()).len(), 6, "no rule keeps all");
        assert_eq!(
            keep(Retention {
                keep_last: Some(2),
                ..Default::default()
            }),
            ["e", "f"]
        );
        // Newest of 2 Dec (f), 1 Dec (d), 30 Nov (b).
        assert_eq!(
            keep(Retention {
                daily: Some(3),
                ..Default::default()
            }),
            ["b", "d", "f"]
        );
        // Newest of December (f) and of November (b).
        assert_eq!(
            keep(Retention {
                keep_last: Some(1),
                monthly: Some(5),
                ..Default::default()
            }),
            ["b", "f"]
        );
        assert_eq!(
            keep(Retention {
                hourly: Some(2),
                ..Default::default()
            }),
            ["d", "f"]
        );
    }
}
