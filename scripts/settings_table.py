"""Print the README's configuration table, generated from Settings (`make settings-table`)."""

from __future__ import annotations

from app.config import Settings


def settings_table() -> str:
    lines = ["| variable | default | what it sets |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default in (None, "") else f"`{default}`"
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `SYNTHDERM_{name.upper()}` | {shown} | {description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
