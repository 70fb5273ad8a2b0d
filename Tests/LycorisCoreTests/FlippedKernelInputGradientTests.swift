import LycorisCore
import Testing

/// `Convolution.backwardInputByFlippedKernel` against `Convolution.backwardInput` (itself
/// checked against the definition in ConvolutionTests): 1-, 2- and 3-D kernels, dilation,
/// padding from 0 to d·(k−1), even and odd kernels; nil for strides, groups and padding
/// beyond the kernel's reach.
@Suite struct FlippedKernelInputGradientTests {
    static let tolerance = 1e-5

    static let geometries: [ConvGeometry] = [
        ConvGeometry(inChannels: 3, outChannels: 4, kernelSize: [3, 3], padding: [1, 1]),
        ConvGeometry(inChannels: 2, outChannels: 5, kernelSize: [3, 2], padding: [0, 1]),
        ConvGeometry(inChannels: 4, outChannels: 3, kernelSize: [3], padding: [2], dilation: [2]),
        ConvGeometry(inChannels: 3, outChannels: 2, kernelSize: [3, 2, 3], padding: [1, 0, 2]),
        ConvGeometry(inChannels: 5, outChannels: 5, kernelSize: [1, 1]),
        ConvGeometry(inChannels: 2, outChannels: 3, kernelSize: [5, 3], padding: [2, 1], dilation: [1, 2]),
    ]

    @Test(arguments: geometries)
    func matchesTheScatteringBackward(geometry: ConvGeometry) throws {
        let spatial = [6, 7, 5].suffix(geometry.spatialRank)
        let inputShape = [2, geometry.inChannels] + spatial
        let weight = uniformTensor(geometry.weightShape, seed: 11)
        let outputShape = Convolution.forward(Tensor.zeros(inputShape), weight: weight, geometry: geometry).shape
        let gradOutput = uniformTensor(outputShape, seed: 12)
        let expected = Convolution.backwardInput(gradOutput, weight: weight, geometry: geometry, inputShape: inputShape)
        let actual = try #require(Convolution.backwardInputByFlippedKernel(gradOutput, weight: weight, geometry: geometry,
                                                                           inputShape: inputShape))
        #expect(actual.shape == expected.shape)
        #expect(relativeError(actual.scalars, expected.scalars.map(Double.init)) < Self.tolerance)
    }

    @Test func declinesStridesGroupsAndWidePadding() {
        let cases = [
            ConvGeometry(inChannels: 2, outChannels: 2, kernelSize: [3, 3], stride: [2, 1], padding: [1, 1]),
            ConvGeometry(inChannels: 4, outChannels: 2, kernelSize: [3, 3], padding: [1, 1], groups: 2),
            ConvGeometry(inChannels: 2, outChannels: 2, kernelSize: [3], padding: [3]),
        ]
        for geometry in cases {
            let inputShape = [1, geometry.inChannels] + [Int](repeating: 6, count: geometry.spatialRank)
            let weight = uniformTensor(geometry.weightShape, seed: 1)
            let gradOutput = Convolution.forward(Tensor.zeros(inputShape), weight: weight, geometry: geometry)
            #expect(Convolution.backwardInputByFlippedKernel(gradOutput, weight: weight, geometry: geometry, inputShape: inputShape) == nil)
        }
    }
}
