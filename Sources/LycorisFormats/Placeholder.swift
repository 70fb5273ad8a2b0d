enum LycorisFormatsPlaceholder {}
