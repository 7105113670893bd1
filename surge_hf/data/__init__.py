"""The data of the training scripts: text (`text`, `text_augmentation`) and image (`image`, `image_transforms`,
`image_processing`) classification datasets loaded and checked before any work, their evaluation metrics
(`metrics`, and the offline `evaluate` module in `glue_metric/`), and the offline data of the demo (`demo`)."""
