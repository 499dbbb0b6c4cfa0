"""``python -m dlsm.report`` (the moons report, :mod:`dlsm.report.moons`), ``python -m dlsm.report digits``
(the digits report, :mod:`dlsm.report.digits`) and ``python -m dlsm.report guidance`` (:mod:`dlsm.report.guidance`)."""

from __future__ import annotations

import sys

from dlsm.report import digits, guidance, moons


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["digits"]:
        return digits.main(argv[1:])
    if argv[:1] == ["guidance"]:
        return guidance.main(argv[1:])
    return moons.main(argv)


if __name__ == "__main__":
    sys.exit(main())
