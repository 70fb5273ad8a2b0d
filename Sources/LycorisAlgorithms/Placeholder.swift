enum LycorisAlgorithmsPlaceholder {}
