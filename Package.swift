// swift-tools-version:5.9
// The Herald SDK for iOS and macOS as a Swift package: in Xcode, File → Add Package
// Dependencies… → this repository's URL, "Up to Next Major Version" from a release tag
// (one that has this file; see README.md, "Add the SDK to an app"). The Rust core is the binary
// XCFramework attached to that release. `scripts/release-apple.sh` (macOS) builds its zip
// and writes the three values below — the version, the zip's URL and its checksum — and
// the generated Swift binding into swift/Sources/Herald/ in the release commit; only a
// release tag resolves. Until the first release the URL is a placeholder: build from a
// local checkout with bindings/Package.swift instead (bindings/README.md).
import PackageDescription

let version = "0.1.0"
let heraldFFIURL = "https://example.invalid/not-released-yet/HeraldFFI.xcframework.zip"
let heraldFFIChecksum = "0000000000000000000000000000000000000000000000000000000000000000"

let package = Package(
    name: "Herald",
    platforms: [.iOS(.v16), .macOS(.v13)],
    products: [
        .library(name: "Herald", targets: ["Herald"]),
    ],
    targets: [
        .binaryTarget(name: "HeraldFFI", url: heraldFFIURL, checksum: heraldFFIChecksum),
        .target(name: "Herald", dependencies: ["HeraldFFI"], path: "swift/Sources/Herald"),
    ]
)
