"""What the method's plots (tradeoff_plot.py, curves_plot.py) draw alike: the dense reference
lines and the finishing of an accuracy figure."""


def dense_reference_lines(ax, dense_acc):
    """A_dense and the issue's bar (2 points below it), when the dense accuracy is given."""
    if dense_acc is not None:
        ax.axhline(100 * dense_acc, color="gray", ls="--", lw=1, label=f"dense {100 * dense_acc:.1f}%")
        ax.axhline(100 * dense_acc - 2, color="gray", ls=":", lw=1, label="dense - 2 points")


def finish_accuracy_figure(fig, ax, xlabel, title, png):
    """Labels, grid and legend of a test-accuracy figure; writes it to ``png``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    # Below the axes: inside, the legend hid the points that matter (the 24-epoch runs sit
    # right under the dense lines, where a "best" legend lands).
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(png, bbox_inches="tight")
    print(f"wrote {png}")
