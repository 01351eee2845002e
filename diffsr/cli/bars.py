"""Terminal progress bars fed by the one progress callback (files, and the tiles or steps of each)."""

from __future__ import annotations

import sys

from diffsr.progress import Progress


class ProgressBars:
    """Progress bars over files and over the tiles of the current image, fed by the one callback."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.files = None
        self.tiles = None

    def __call__(self, progress: Progress) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if progress.stage == "files":
            if self.files is None:
                self.files = tqdm(total=progress.total, unit="img", desc="images", position=0, file=sys.stderr)
            self.files.n = progress.done
            self.files.refresh()
            if self.tiles is not None:
                self.tiles.close()
                self.tiles = None
        else:
            if progress.total <= 1:
                return
            if self.tiles is None or progress.done == 0:
                if self.tiles is not None:
                    self.tiles.close()
                self.tiles = tqdm(total=progress.total, unit=progress.stage[:-1] or "it", desc=progress.stage, position=1, leave=False, file=sys.stderr)
            self.tiles.total = progress.total
            self.tiles.n = progress.done
            self.tiles.refresh()

    def close(self) -> None:
        for bar in (self.tiles, self.files):
            if bar is not None:
                bar.close()
