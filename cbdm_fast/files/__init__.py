"""Files the programs write and read.

    atomic.py      atomic writes (a temporary file, then a rename)
    integrity.py   the sha256 trailer that makes a torn or altered file detectable
    checkpoint.py  training checkpoints: save, load, verify, find, rotate
    models.py      the UNet a checkpoint holds (ours or the authors'), built and loaded strictly
    arrays.py      .npz archives, with messages that say what a file is when it is not one
    images.py      image files and grids over numpy and Pillow
    paths.py       command-line paths checked before any work, naming the flag
"""
