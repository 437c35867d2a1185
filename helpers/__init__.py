"""The helpers the align-llama notebooks call for what is not the lesson: settings, data, the model load, library
fixes, callbacks, evaluation and plots. Importing the package imports nothing; each module imports what it uses."""
