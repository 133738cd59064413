"""Print the config key table (every key of the schema: default, accepted values, help), or with
--write replace the table between the config-keys markers in docs/configuration.md with it."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdp_cli.config.reference import markdown_table, readme_with_table

CONFIGURATION_DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--write", action="store_true", help="rewrite the table in docs/configuration.md"
    )
    args = parser.parse_args()
    table = markdown_table()
    if args.write:
        text = CONFIGURATION_DOC.read_text(encoding="utf-8")
        CONFIGURATION_DOC.write_text(readme_with_table(text, table), encoding="utf-8")
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
