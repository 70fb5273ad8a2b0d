import ArgumentParser
import LycorisCore

/// `lycoris`: inspect, merge and demo LyCORIS adapter files.
@main
struct LycorisCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lycoris",
        abstract: "LyCORIS adapters in Swift: inspect, merge, and a self-contained training demo.",
        version: LycorisVersion.string,
        subcommands: [InfoCommand.self, MergeCommand.self, DemoCommand.self, LayersCommand.self, ExtractCommand.self, ResizeCommand.self,
                      ConvertCommand.self, SuggestCommand.self]
    )
}
