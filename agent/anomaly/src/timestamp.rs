//! Parsing NAB's `YYYY-MM-DD HH:MM:SS[.ffffff]` timestamps (UTC) to Unix seconds.

/// A timestamp that is not `YYYY-MM-DD HH:MM:SS[.fraction]`.
#[derive(Debug, thiserror::Error)]
#[error("timestamp {0:?}: expected `YYYY-MM-DD HH:MM:SS[.ffffff]`")]
pub struct TimestampError(pub String);

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DD HH:MM:SS` (a `T` separator and a fractional part are accepted; the
/// fraction is dropped) to seconds since the Unix epoch.
pub fn parse_timestamp(s: &str) -> Result<i64, TimestampError> {
    let err = || TimestampError(s.into());
    let s2 = s.trim();
    let (date, time) = s2.split_once([' ', 'T']).ok_or_else(err)?;
    let mut d = date.split('-');
    let num = |it: &mut std::str::Split<'_, char>| -> Result<i64, TimestampError> {
        it.next().ok_or_else(err)?.parse::<i64>().map_err(|_| err())
    };
    let (y, mo, da) = (num(&mut d)?, num(&mut d)?, num(&mut d)?);
    let time = time.split('.').next().ok_or_else(err)?;
    let mut t = time.split(':');
    let (h, mi, se) = (num(&mut t)?, num(&mut t)?, num(&mut t)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return Err(err());
    }
    Ok(days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + se)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nab_timestamps() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00").unwrap(), 0);
        assert_eq!(
            parse_timestamp("2014-04-10 07:15:00.000000").unwrap(),
            1_397_114_100
        );
        assert_eq!(parse_timestamp("2000-03-01 00:00:01").unwrap(), 951_868_801);
        assert!(parse_timestamp("2014-13-10 07:15:00").is_err());
        assert!(parse_timestamp("yesterday").is_err());
        assert!(parse_timestamp("").is_err());
    }
}
