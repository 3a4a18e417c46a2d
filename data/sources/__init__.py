"""Every source of ImageNet that a --data-dir may hold, one module each:

    class-folders   DIR/train/<wnid>/, DIR/val/<wnid>/                   class_folders.py
    shards          DIR/<name>-train-NNNN.tar, -validation-NN.tar         shards.py (shard_index.py)
    archives        DIR/ILSVRC2012_img_{train,val}.tar + devkit           archives.py (archive_index.py)
    kaggle          Kaggle's download unzipped (train/ and a flat val/)   kaggle.py
    kaggle-zip      Kaggle's zip itself                                   kaggle_zip.py (archive_index.py)

Each gives its samples in the class folders' order and the bytes of sample i, so the
samplers, the decode paths and exact resume never learn which one they read. layout.py says
which source a folder holds; val_labels.py reads the labels of flat validation images.
"""
