import FuzzSupport
import LycorisCore
import LycorisFormats

/// The safetensors reader on arbitrary bytes: the in-memory validator, then the same bytes as
/// a mapped file, every tensor decoded to F32 and every raw byte range read. A validated header
/// must agree with the mapped file's, and its tensors must tile the data buffer exactly.
nonisolated(unsafe) private let scratch = ScratchFile()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSafetensors(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let bytes = UnsafeRawBufferPointer(start: data, count: size)
    let header: SafetensorsHeader
    do {
        header = try SafetensorsHeader.validate(file: bytes)
    } catch {
        _ = "\(error)"  // every error must describe itself without trapping
        return 0
    }
    precondition(header.fileSize == size, "a validated header describes \(header.fileSize) bytes of \(size)")
    scratch.store(bytes)
    do {
        let file = try SafetensorsFile(path: scratch.path)
        precondition(file.header == header, "the mapped file's header differs from the in-memory one")
        var covered = 0
        for info in file.tensors {
            precondition(info.byteRange.lowerBound == covered, "tensor \(info.name) does not start where the previous ended")
            covered = info.byteRange.upperBound
            let tensor = try file.tensor(info.name)
            precondition(tensor.count == info.elementCount, "tensor \(info.name) decoded to \(tensor.count) elements")
            _ = try file.rawBytes(info.name)
        }
        precondition(header.dataStart + covered == size, "the tensors do not cover the data buffer")
        _ = file.allTensors()
        _ = file.metadata
    } catch {
        preconditionFailure("bytes the validator accepted failed to read as a file: \(error)")
    }
    return 0
}
