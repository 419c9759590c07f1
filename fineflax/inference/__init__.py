"""Using a trained run: exact evaluation with a report (`evaluate_run`), and prediction
on images (`predict_fn`)."""
