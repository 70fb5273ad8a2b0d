/// The version of this package's tools: `lycoris --version` and the server's `initialize`
/// answer (`server.version`) report it.
public enum LycorisVersion {
    public static let string = "0.1.0"
}
