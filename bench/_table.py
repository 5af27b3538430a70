"""The one table layout every bench script prints: first column left, the rest right-aligned."""


def print_cells(cells: list[tuple[str, ...]]) -> None:
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    for i, c in enumerate(cells):
        print(" | ".join(s.ljust(w) if j == 0 else s.rjust(w) for j, (s, w) in enumerate(zip(c, widths, strict=True))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
