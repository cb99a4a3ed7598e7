//! The one way Entitle writes CSV: the `csv` crate quotes every cell that
//! needs it (commas, quotes, line breaks in a SKU or a product name), and no
//! cell reaches a spreadsheet as a formula.

use std::borrow::Cow;

/// First characters that make a spreadsheet read a cell as a formula (`=`,
/// `+`, `-`, `@`), or that can hide one behind them (tab, carriage return).
const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// `cell` as a spreadsheet shows it but never runs it: a leading `'` when it
/// starts like a formula (OWASP's "CSV injection" advice). Codes, ids, dates
/// and counts never start so; names, SKUs and free text can.
pub fn neutralised(cell: &str) -> Cow<'_, str> {
    if cell.starts_with(FORMULA_STARTS) {
        Cow::Owned(format!("'{cell}"))
    } else {
        Cow::Borrowed(cell)
    }
}

/// CSV being written to memory: RFC 4180 (quoted where needed, CRLF line
/// ends), each cell [`neutralised`].
pub struct Sheet {
    writer: csv::Writer<Vec<u8>>,
}

impl Default for Sheet {
    fn default() -> Self {
        Self::new()
    }
}

impl Sheet {
    pub fn new() -> Self {
        Self {
            writer: csv::WriterBuilder::new()
                .terminator(csv::Terminator::CRLF)
                .from_writer(Vec::new()),
        }
    }

    /// Appends one record.
    pub fn row<I, T>(&mut self, cells: I)
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let cells = cells
            .into_iter()
            .map(|cell| neutralised(cell.as_ref()).into_owned());
        // Writing to memory cannot fail: the only errors are I/O ones.
        let _ = self.writer.write_record(cells);
    }

    /// The file so far.
    pub fn into_bytes(self) -> Vec<u8> {
        // As above: flushing into a Vec cannot fail.
        self.writer.into_inner().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_starts_are_neutralised_and_the_rest_left_alone() {
        for cell in ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(neutralised(cell), format!("'{cell}"));
        }
        for cell in ["ABCD-EFGH", "Kit, basic", "2026-01-01", "", "a=b"] {
            assert_eq!(neutralised(cell), cell);
        }
    }

    #[test]
    fn a_sheet_round_trips_through_the_csv_reader() {
        let mut sheet = Sheet::new();
        sheet.row(["name", "note"]);
        sheet.row(["Kit, \"pro\"", "=HYPERLINK(\"x\")"]);
        let bytes = sheet.into_bytes();
        assert!(bytes.ends_with(b"\r\n"));
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(&rows[0][0], "Kit, \"pro\"");
        assert_eq!(&rows[0][1], "'=HYPERLINK(\"x\")");
    }
}
