"""Files the programs write and read: atomic writes (atomic), the sha256 trailer that makes a torn or
corrupt file detectable (integrity), training checkpoints and the models they hold (checkpoint), and
image files and grids over numpy and Pillow (images)."""
