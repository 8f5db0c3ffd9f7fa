"""Country → region mapping. The default keeps the UK, the European area and the rest apart."""

from __future__ import annotations

import json
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


class RegionMap:
    """Maps a country to a region: explicit entries first, then `default`."""

    def __init__(self, countries: dict[str, str], default: str):
        self.countries = dict(countries)
        self.default = default

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
            text = path.read_text()
            raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read region mapping: {exc}", file=str(path)) from exc
        countries = raw.get("countries")
        default = raw.get("default")
        if not isinstance(countries, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in countries.items()
        ):
            raise DataError("'countries' must map country names to non-empty region names",
                            file=str(path), column="countries")
        if not isinstance(default, str) or not default.strip():
            raise DataError("'default' must name the region of unlisted countries",
                            file=str(path), column="default")
        return cls(countries, default)

    def __call__(self, country: str) -> str:
        return self.countries.get(country, self.default)
