"""Print the config key table (every key of the schema: default, accepted values, help), or with
--write replace the table between the config-keys markers in README.md with it."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdp_cli.config.reference import markdown_table, readme_with_table

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the table in README.md")
    args = parser.parse_args()
    table = markdown_table()
    if args.write:
        README.write_text(readme_with_table(README.read_text(encoding="utf-8"), table))
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
