"""Data: reading, finding, downloading and converting datasets.

* :mod:`netlite.data.idx`: the IDX file format (:func:`load_idx`,
  :func:`save_idx`, :class:`IDXFormatError`);
* :mod:`netlite.data.catalog`: the named datasets (``"mnist"``,
  ``"fashion-mnist"``) and the directories searched for them
  (:func:`set_data_dir`, :func:`search_dirs`);
* :mod:`netlite.data.lookup`: :func:`find_dataset`, which searches and
  downloads when needed (:class:`DatasetNotFoundError`);
* :mod:`netlite.data.download`: downloading from the mirrors;
* :mod:`netlite.data.verify`: MD5 checks (:class:`ChecksumError`);
* :mod:`netlite.data.mnist`: :func:`load_mnist` and the process-wide cache
  of loaded files;
* :mod:`netlite.data.lmdb`: py-lmdb import, shared environments, Datum
  decoding (for the ``Data`` layer);
* :mod:`netlite.data.transform`: :class:`DataTransformer`, Caffe's
  ``transform_param``;
* :mod:`netlite.data.convert_mnist`: IDX -> LMDB (``netlite convert-mnist``).

See docs/datasets.md.
"""
