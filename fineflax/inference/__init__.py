"""Using a trained run: exact evaluation with a report (`evaluate`), prediction on images
in memory (`arrays.predict_fn`) and on image files (`predict`, `zero_shot`, with
`image_files` and `predictions`)."""
