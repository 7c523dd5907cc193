"""The data-quality summary: every row read is either used or set aside for a named reason.

>>> q = QualityReport()
>>> q.add_table("measurement", read=10, used=7, set_aside={"concept 0": 2, "null dates": 1})
>>> q.check()
>>> q.tables["measurement"].set_aside
{'concept 0': 2, 'null dates': 1}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ehrgpt.util import atomic


@dataclass
class TableQuality:
    """Rows read from one table, how many were used, and the rest by reason."""

    read: int
    used: int
    set_aside: dict[str, int] = field(default_factory=dict)
    status: str = "ok"
    note: str = ""


@dataclass
class QualityReport:
    """Counts of what happened to the input, written as data_quality.json and shown as a table."""

    source: str = ""
    tables: dict[str, TableQuality] = field(default_factory=dict)
    visits: dict[str, int] = field(default_factory=dict)
    patients: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)

    def add_table(
        self,
        name: str,
        *,
        read: int,
        used: int,
        set_aside: dict[str, int] | None = None,
        status: str = "ok",
        note: str = "",
    ) -> None:
        reasons = {k: int(v) for k, v in sorted((set_aside or {}).items()) if v}
        self.tables[name] = TableQuality(int(read), int(used), reasons, status, note)

    def check(self) -> None:
        """Raise AssertionError if any table's read count differs from used + set aside."""
        for name, t in self.tables.items():
            total = t.used + sum(t.set_aside.values())
            if total != t.read:
                raise AssertionError(
                    f"data-quality counts do not add up for {name}: read {t.read} != used "
                    f"{t.used} + set aside {sum(t.set_aside.values())}"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        atomic.write_json(path, self.to_dict(), indent=2)

    @classmethod
    def read(cls, path: Path) -> QualityReport:
        data = json.loads(Path(path).read_text())
        tables = {k: TableQuality(**v) for k, v in data.pop("tables").items()}
        return cls(tables=tables, **data)

    def render(self, console: Console | None = None) -> None:
        """Print the summary tables (rows per table; visits; patients; tokens)."""
        console = console or Console()
        table = Table(title=f"Data quality: {self.source}", title_justify="left")
        for col in ("table", "read", "used", "set aside", "reasons"):
            table.add_column(
                col, justify="right" if col in ("read", "used", "set aside") else "left"
            )
        for name, t in self.tables.items():
            reasons = ", ".join(f"{k} {v:,}" for k, v in t.set_aside.items())
            if t.status != "ok":  # the whole table set aside: say why once
                reasons = f"[yellow]{t.status}[/]: {t.note}"
            table.add_row(
                name, f"{t.read:,}", f"{t.used:,}", f"{sum(t.set_aside.values()):,}", reasons
            )
        console.print(table)
        for title, counts in (
            ("Visits", self.visits),
            ("Patients", self.patients),
            ("Tokens", self.tokens),
        ):
            if not counts:
                continue
            small = Table(title=title, title_justify="left", show_header=False)
            small.add_column("what")
            small.add_column("count", justify="right")
            for k, v in counts.items():
                shown = (
                    f"{v:,}"
                    if isinstance(v, int)
                    else ", ".join(f"{a} {b:,}" for a, b in v.items())
                    if isinstance(v, dict)
                    else str(v)
                )
                small.add_row(k, shown)
            console.print(small)
