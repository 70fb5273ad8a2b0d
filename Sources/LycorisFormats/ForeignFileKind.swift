/// What a file that is not safetensors at all looks like, from its first bytes, so that a
/// text file or a `torch.save` archive given as an adapter is reported as such ("not a
/// safetensors file: it begins like text") instead of by the number its first 8 bytes make
/// as a header length.
///
/// Consulted only when the header length prefix is already invalid (rules 2 and 3 of
/// ``SafetensorsHeader``), so it never turns a valid file away.
enum ForeignFileKind {
    /// A description of the content (`"a ZIP archive (torch.save's format)"`, `"text"`, …), or
    /// nil when the first bytes match nothing known and are not text.
    static func describe(_ file: UnsafeRawBufferPointer) -> String? {
        let prefix = Array(file.prefix(8))
        func starts(with signature: [UInt8]) -> Bool { prefix.starts(with: signature) }
        if starts(with: [0x50, 0x4B, 0x03, 0x04]) { return "a ZIP archive (torch.save's format; convert it to safetensors)" }
        if prefix.count >= 2 && prefix[0] == 0x80 && (2...5).contains(prefix[1]) { return "a Python pickle" }
        if starts(with: [0x89, 0x50, 0x4E, 0x47]) { return "a PNG image" }
        if starts(with: Array("GGUF".utf8)) { return "a GGUF file" }
        if !prefix.isEmpty && prefix.allSatisfy(isText) {
            let shown = prefix.map { byte -> String in
                switch byte {
                case 0x0A: return "\\n"
                case 0x0D: return "\\r"
                case 0x09: return "\\t"
                case 0x22: return "\\\""
                default: return String(UnicodeScalar(byte))
                }
            }.joined()
            return "text (it begins \"\(shown)\")"
        }
        return nil
    }

    /// Printable ASCII, tab, line feed or carriage return.
    private static func isText(_ byte: UInt8) -> Bool {
        (0x20...0x7E).contains(byte) || byte == 0x09 || byte == 0x0A || byte == 0x0D
    }
}
