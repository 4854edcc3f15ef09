"""The trainer: config -> components -> loop -> artifacts."""
