"""Region names, and the country → region mapping. The default keeps the UK, the European area
and the rest apart."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from fedrec.errors import DataError

EUROPEAN_COUNTRIES = frozenset({
    # EU member states
    "Austria", "Belgium", "Bulgaria", "Croatia", "Cyprus", "Czech Republic", "Czechia", "Denmark",
    "Estonia", "Finland", "France", "Germany", "Greece", "Hungary", "Ireland", "EIRE", "Italy",
    "Latvia", "Lithuania", "Luxembourg", "Malta", "Netherlands", "Poland", "Portugal", "Romania",
    "Slovakia", "Slovenia", "Spain", "Sweden", "European Community",
    # EEA, Switzerland and the Channel Islands
    "Iceland", "Liechtenstein", "Norway", "Switzerland", "Channel Islands",
})

# A region's name is its silo's folder name (OUT/<region>), so it must never be a path, `.`, `..`
# or a name prepare writes beside the silos (catalog.parquet, summary.json).
REGION_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
REGION_RULE = "1 to 32 of a-z, 0-9, '-' and '_', starting with a letter or digit; case does not matter"


def region_name(value: object, **location) -> str:
    """`value` as a region name: stripped and lower-cased (`EU` and `eu` are one region). Anything
    else raises a DataError at `location` (its file, row, column)."""
    name = value.strip().lower() if isinstance(value, str) else ""
    if not REGION_NAME.fullmatch(name):
        raise DataError(f"{value!r} is not a region name ({REGION_RULE})", **location)
    return name


class RegionMap:
    """Maps a country to a region: explicit entries first, then `default`. `file` names where the
    mapping came from, for errors."""

    def __init__(self, countries: dict[str, str], default: str, file: str | None = None):
        self.countries = {country: region_name(region, file=file, column=f"countries.{country}")
                          for country, region in countries.items()}
        self.default = region_name(default, file=file, column="default")

    @classmethod
    def standard(cls) -> "RegionMap":
        mapping = {country: "eu" for country in EUROPEAN_COUNTRIES}
        mapping["United Kingdom"] = "uk"
        return cls(mapping, default="row")

    @classmethod
    def from_file(cls, path: str | Path) -> "RegionMap":
        """A JSON or TOML file: {"default": "row", "countries": {"France": "eu", ...}}."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:         # UnicodeDecodeError and TOMLDecodeError included
            raise DataError(f"cannot read region mapping: {exc}", file=str(path)) from exc
        if not isinstance(raw, dict):
            raise DataError(f"a region mapping is an object with 'default' and 'countries', got "
                            f"{type(raw).__name__}", file=str(path))
        countries = raw.get("countries")
        if not isinstance(countries, dict):
            raise DataError("'countries' must map country names to region names", file=str(path),
                            column="countries")
        if "default" not in raw:
            raise DataError("'default' must name the region of unlisted countries", file=str(path),
                            column="default")
        return cls(countries, raw["default"], str(path))

    def __call__(self, country: str) -> str:
        return self.countries.get(country, self.default)
