"""What the suites' plots share: a panel that has nothing to show says why, in the panel."""


def no_data(ax, reason: str) -> None:
    """Writes "no data: <reason>" in the middle of an axes left empty, and hides its meaningless ticks."""
    ax.text(0.5, 0.5, f"no data:\n{reason}", transform=ax.transAxes, ha="center", va="center", wrap=True,
            fontsize=10, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])
