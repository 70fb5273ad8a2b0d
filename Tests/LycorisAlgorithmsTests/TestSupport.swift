import Foundation
import LycorisCore
import Testing

/// The directory of the test target's copied fixtures.
let fixturesDirectory: URL = Bundle.module.url(forResource: "Fixtures", withExtension: nil)!
