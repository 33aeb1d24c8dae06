"""The application: explain by name, models and preprocessing, images, rendering, the HTML gallery, dataset
runs and their files. Built on the core; never imported by it."""
